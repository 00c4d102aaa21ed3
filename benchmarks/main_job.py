"""The README's main job, run as the README says, with its printout written into the README.

    python benchmarks/main_job.py                  # run it (fresh run folder), update README.md
    python benchmarks/main_job.py --no-readme      # run it and print, README untouched

Runs ``recipes/hh_bon.py --config recipes/configs/hh_bon_tiny.yaml`` into a fresh folder, times it,
and writes what it printed between the README's ``main-job`` markers, and the report fields that
printout is made of to ``docs/main_job_report.json``. ``tests/test_readme.py`` renders that JSON
with :func:`render` and fails when the README's block differs: a change to the printout's format
that was not rerun here shows up there.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RECORD = ROOT / "docs" / "main_job_report.json"
CONFIG = "recipes/configs/hh_bon_tiny.yaml"
BLOCK = re.compile(r"(<!-- main-job:start -->\n```\n)(.*?)(```\n<!-- main-job:end -->)", flags=re.S)
#: The fields of the recipe's report that its printout reads (recipes/ctrl_pipeline.py, ``summary``).
PRINTED = ("win_rates", "kl", "training", "build", "training_kl", "plan_diagnostics", "adapter")

if str(ROOT / "recipes") not in sys.path:
    sys.path.insert(0, str(ROOT / "recipes"))  # ctrl_pipeline, as recipes/hh_bon.py finds it


def render(record: dict) -> str:
    """The main job's printout from its record: the run's time and folder, the recipe's summary, where things are."""
    from ctrl_pipeline import summary

    return (f"run finished in {record['seconds']:.0f} s: {record['output_dir']}\n{summary(record['report'])}\n"
            f"adapter: {record['report']['adapter']}   report: {record['output_dir']}/eval/report.md\n")


def readme_block(text: str) -> str:
    """The printout inside the README's main-job markers."""
    found = BLOCK.search(text)
    if found is None:
        raise SystemExit("README.md has no <!-- main-job:start --> … <!-- main-job:end --> block")
    return found.group(2)


def run(output_dir: str) -> dict:
    """Run the main job into ``output_dir`` (removed first), as the README's command does; its record."""
    from ctrl_pipeline import parse_recipe_args, run_recipe

    shutil.rmtree(ROOT / output_dir, ignore_errors=True)
    argv = ["--config", CONFIG, "--output_dir", output_dir]
    started = time.perf_counter()
    recipe, model_args, training_args = parse_recipe_args(argv)
    report = run_recipe(recipe, model_args, training_args, command=" ".join(["hh_bon.py", *argv]))
    seconds = time.perf_counter() - started
    kept = {key: report.get(key) for key in PRINTED}
    kept["win_rates"] = [{k: v for k, v in row.items() if k != "per_prompt"} for row in report["win_rates"]]
    kept["kl"] = {k: report["kl"][k] for k in ("value", "ci_low", "ci_high")}
    return {"command": f"python recipes/hh_bon.py --config {CONFIG} --output_dir {output_dir}",
            "seconds": seconds, "output_dir": output_dir, "date": time.strftime("%Y-%m-%d"), "report": kept}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo", help="the run folder (default runs/demo, the README's)")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave README.md and the record as they are")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = run(args.output_dir)
    text = render(record)
    print(text, end="")
    if not args.no_readme:
        RECORD.write_text(json.dumps(record, indent=2, default=str) + "\n")
        readme = README.read_text()
        readme_block(readme)  # the markers are there
        README.write_text(BLOCK.sub(lambda m: m.group(1) + text + m.group(3), readme))
        print(f"wrote {README} and {RECORD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
