"""Stable public entry point ``python -m megacpp_mcore.launch_pretrain``: see
:mod:`megacpp_mcore.upstream.launch_pretrain`."""

if __name__ == "__main__":
    import sys

    from megacpp_mcore.upstream.launch_pretrain import main

    sys.exit(main())
