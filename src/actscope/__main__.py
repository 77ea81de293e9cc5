"""``python -m actscope``: the command line, as torchrun starts it (``torchrun … -m actscope profile …``)."""
from actscope.cli.main import main

if __name__ == "__main__":
    main()
