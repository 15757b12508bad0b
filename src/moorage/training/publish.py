"""Publishing a trained folder: the lineage its manifest records (parent, data, every
hyper-parameter, package and code versions, validation history) and its registration."""
