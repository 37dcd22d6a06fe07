"""Pre-flight checks for `python -m mixtune.doctor`: cheap answers before GPU hours are spent.

report.py         one PASS / WARN / FAIL / SKIP line per check
recipe_checks.py  the recipe loads; the model config and its size; the sliding window
data_checks.py    the data loads (problems counted); the chat template round-trips
model_checks.py   the built model: adapters and router policy, 4-bit experts, ZeRO-3 leaves,
                  router losses at step 0
"""
