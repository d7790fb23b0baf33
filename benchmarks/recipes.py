"""Training recipes' peak memory and time per update/step on this machine: PPO and DPO at the docs' scale.

    .venv/bin/python benchmarks/recipes.py [--only ppo dpo] [--prompts 64] [--steps 3] [-- EXTRA RECIPE FLAGS]
    .venv/bin/python benchmarks/recipes.py --only ppo --ppo-arm "former=--per_device_train_batch_size 8 \
        --gradient_accumulation_steps 1 --gradient_checkpointing false --release_memory false \
        --response_logits false" --ppo-arm "ppo-cpu="

Each recipe runs alone, in its own process, one after the other, on the first N HH-RLHF items:
- ppo: `rlcd-data train ppo` with the `ppo-cpu` preset (rollout batch 8, 64 new tokens), the embedded
  SmolLM2-135M-Instruct policy, a MiniLM-L6 reward model trained first on the validation pairs
  (not timed), N HH prompts, --steps updates;
- dpo: `rlcd-data train dpo` with the `dpo-cpu` preset (batch 4, max length 512), the same policy, N
  HH-RLHF validation pairs (human labels), --steps steps.
--ppo-arm LABEL=FLAGS (repeatable) runs PPO once per arm with those flags, one after the other, for
ratios from one invocation (default: one arm, the preset as it is).
Peak resident memory is the recipe process's own (getrusage of the finished child), the time per
update or step the recipe's own figure (training only, model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HH = REPO.parent / "shared" / "data" / "hh-rlhf"


def run(args: list[str]) -> tuple[dict, float]:
    """Run `rlcd-data ARGS` in a child process; (its last JSON line, its peak RSS in MiB).

    The child runs under a process of its own that reports the peak of its children alone
    (getrusage keeps the largest child ever waited for).
    """
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "rlcd_data", *args],
                         stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()
    metrics = json.loads([line for line in out if line.startswith('{"')][-1])
    peak_kb = int(next(line.split()[1] for line in out if line.startswith("PEAK_RSS_KB")))
    return metrics, peak_kb / 1024


def report(row: tuple, model: str) -> None:
    recipe, data, peak, per = row
    print(f"{recipe}: {model}, {data}, peak RSS {peak:.0f} MiB, {per}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["ppo", "dpo"], default=["ppo", "dpo"])
    parser.add_argument("--prompts", type=int, default=64, help="HH prompts (PPO) or pairs (DPO)")
    parser.add_argument("--steps", type=int, default=3, help="PPO updates / DPO optimizer steps")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ppo-arm", action="append", default=None, metavar="LABEL=FLAGS",
                        help="a PPO run with these extra flags (repeatable; default: one run of the preset)")
    parser.add_argument("extra", nargs="*", help="more flags for every recipe (after --)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="recipes-"))
    prompts = tmp / "prompts.jsonl"
    lines = (HH / "harmless-base-prompts.jsonl").read_text().splitlines()[: args.prompts]
    prompts.write_text("\n".join(lines) + "\n")
    rows = []
    for recipe in args.only:
        if recipe == "ppo":
            rm = tmp / "rm"
            subprocess.run([sys.executable, "-m", "rlcd_data", "train", "reward", "--dataset",
                            str(HH / "harmless-base-validation.jsonl"), "--limit", "256", "--model", "minilm-l6",
                            "--preset", "reward-cpu-small", "--output_dir", str(rm), "--disable_tqdm", "true"],
                           stdout=subprocess.DEVNULL, check=True)
            for arm in args.ppo_arm or ["ppo-cpu="]:
                label, _, flags = arm.partition("=")
                metrics, peak = run(["train", "ppo", "--reward_model", str(rm), "--policy", args.model, "--prompts",
                                     str(prompts), "--output_dir", str(tmp / "ppo"), "--steps", str(args.steps),
                                     "--disable_tqdm", "true", *args.extra, *shlex.split(flags)])
                per = metrics["seconds_per_update"]
                rows.append((f"ppo ({label})", f"{args.prompts} HH prompts", peak, f"{per:.1f} s/update"))
                report(rows[-1], args.model)
        else:
            metrics, peak = run(["train", "dpo", "--dataset", str(HH / "harmless-base-validation.jsonl"), "--limit",
                                 str(args.prompts), "--model", args.model, "--output_dir", str(tmp / "dpo"),
                                 "--max_steps", str(args.steps), "--disable_tqdm", "true", *args.extra])
            per = metrics["seconds_per_step"]
            rows.append(("dpo (dpo-cpu)", f"{args.prompts} HH pairs", peak, f"{per:.1f} s/step"))
            report(rows[-1], args.model)
    print("\n| recipe | policy | data | peak RSS | time |\n|---|---|---|---|---|")
    for recipe, data, peak, per in rows:
        print(f"| {recipe} | {args.model} | {data} | {peak / 1024:.1f} GiB | {per} |")


if __name__ == "__main__":
    main()
