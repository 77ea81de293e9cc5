"""The command-line interface: a thin typed shell over the Python API."""
