"""`python -m mixtune.quant`: the weight-memory tables of docs/qlora.md."""

from .memory import main

main()
