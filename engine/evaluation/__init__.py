"""Retrieval evaluation: labelled data sets (`datasets/`), the metrics (`metrics.py`), the
leave-one-out benchmark (`benchmark.py`, its k-NN in `knn.py`) and its reports (`report.py`)."""
