"""``python -m ibllm``: see :mod:`ibllm.cli`."""

from ibllm.cli import main

if __name__ == "__main__":
    main()
