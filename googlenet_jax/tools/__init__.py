"""The command-line programs: predict, evaluate, convert, summary (`python -m
googlenet_jax.tools.NAME --help`), and their shared set-up (`cli`)."""
