"""The `engine` command line (`main.py`) and the options it shares with `indexer` (`common.py`).
Nothing in the library imports this package: commands sit at the edge."""
