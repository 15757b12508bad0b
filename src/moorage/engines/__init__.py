"""Adapters to distributed engines (Spark UDF, Spark data sources and sinks)."""
