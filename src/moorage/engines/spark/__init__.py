"""moorage on Apache Spark: registry models as UDFs, data sources for moorage brokers, exactly-once sinks."""
