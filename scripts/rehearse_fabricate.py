"""Write the stand-ins of a rehearsal plan (a JSON list from
tokenreduction.rehearsal.standin_config) that are missing or out of date.

    python scripts/rehearse_fabricate.py plan.json
"""
import argparse
import json
import time

from tokenreduction.rehearsal.fabricate import fabricate, is_current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="JSON list of stand-ins")
    args = parser.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)
    for item in plan:
        if is_current(item):
            continue
        start = time.time()
        fabricate(item)
        print(f"rehearsal stand-in {item['what']} {item.get('kind') or item.get('model') or ''}: "
              f"{item['path']} ({time.time() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
