"""`make demo`: the whole recipe in miniature on the synthetic shapes world, on a laptop CPU.

    1. pretrain     the tiny ManagerTower, MLM + ITM           runs/demo/pretrain
    2. vqa          fine-tune VQA from the pretrained weights   runs/demo/vqa
    3. vqa_scratch  the same budget from random weights         runs/demo/vqa_scratch
    4. managers     AAUE weight heatmaps of the VQA model       runs/demo/vqa/manager_weights_*.png
    5. summary      a table, and runs/demo/summary.json

Each run is the real command line (`python -m mtower_jax.main ...`) in a subprocess; they
share a persistent XLA compilation cache (runs/.xla_cache): the two VQA runs compile the
same programs, and a later `make demo` finds all of them there. The majority baseline answers every question with the answer of
highest total score in the train split, scored on val like the model.

    python -m mtower_jax.tools.demo --workdir=runs/demo [--pretrain_steps=N --vqa_steps=N]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import argparse

import numpy as np


def run_main(config: str, workdir: str, *overrides: str) -> None:
    """One `python -m mtower_jax.main` run; its output streams to this terminal."""
    command = [sys.executable, "-m", "mtower_jax.main", f"--config={config}",
               f"--workdir={workdir}", *overrides]
    print("\n$ " + " ".join(command), flush=True)
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath("runs/.xla_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    subprocess.run(command, check=True, env=env)


def majority_baseline(data_dir: str, train_split: str = "train", eval_split: str = "val"
                      ) -> tuple[str, float]:
    """(answer, its VQA accuracy on `eval_split`): the answer with the highest total soft
    score over the train split's questions, given to every question."""
    from configs import vqav2
    from mtower_jax.data import pipeline

    config = vqav2.get_config("model=tiny")
    config.data.data_dir = data_dir
    answers = pipeline.answer_vocabulary(config)

    def scores(split: str) -> np.ndarray:
        """[questions, answers] soft scores of every question of the split."""
        rows = []
        for _, source, _ in pipeline.split_parts(config, "vqa", split):
            for i in range(len(source)):
                record = source[i]
                for labels, values in zip(record["answer_labels"], record["answer_scores"]):
                    row = np.zeros(len(answers))
                    row[labels[labels >= 0]] = values[labels >= 0]
                    rows.append(row)
        return np.stack(rows)

    best = int(np.argmax(scores(train_split).sum(0)))
    return answers[best], float(scores(eval_split)[:, best].mean())


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(root: str, data_dir: str, pretrain_steps: int, vqa_steps: int) -> dict:
    """Runs the demo into `root` (see the module docstring); returns the summary."""
    start = time.time()
    common = [f"--config.data.data_dir={data_dir}"]
    pretrain, vqa, scratch = (os.path.join(root, n) for n in ("pretrain", "vqa", "vqa_scratch"))
    vqa_budget = [f"--config.total_steps={vqa_steps}"] if vqa_steps else []

    run_main("configs/pretrain.py:model=tiny,data=synthetic", pretrain, *common,
             f"--config.total_steps={pretrain_steps}", "--config.eval_every=0")
    run_main("configs/vqav2.py:model=tiny,data=synthetic", vqa, *common, *vqa_budget,
             f"--config.init_from={pretrain}")
    run_main("configs/vqav2.py:model=tiny,data=synthetic", scratch, *common, *vqa_budget)

    from mtower_jax.tools import plot_managers
    plots = plot_managers.main(vqa, split="val", max_batches=8)

    pre, fine, fresh = (_read(os.path.join(d, "eval_val.json")) for d in (pretrain, vqa, scratch))
    answer, baseline = majority_baseline(data_dir)
    summary = {
        "pretrain": {"steps": pre["step"], "mlm_accuracy": pre["acc_mlm"],
                     "itm_accuracy": pre["acc_itm"]},
        "vqa": {"steps": fine["step"], "accuracy": fine["accuracy"],
                "accuracy_from_scratch": fresh["accuracy"], "majority_baseline": baseline,
                "majority_answer": answer},
        "manager_plots": plots,
        "seconds": round(time.time() - start, 1),
    }
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print("\n| run | steps | metric (val) | value |\n|---|---|---|---|")
    print(f"| pretrain | {pre['step']} | MLM accuracy | {pre['acc_mlm']:.3f} |")
    print(f"| pretrain | {pre['step']} | ITM accuracy | {pre['acc_itm']:.3f} |")
    print(f"| VQA from pretrained | {fine['step']} | VQA accuracy | {fine['accuracy']:.3f} |")
    print(f"| VQA from scratch | {fresh['step']} | VQA accuracy | {fresh['accuracy']:.3f} |")
    print(f"| majority answer ({answer!r}) | - | VQA accuracy | {baseline:.3f} |")
    print(f"\nmanager weight plots: {', '.join(plots)}")
    print(f"summary: {os.path.join(root, 'summary.json')}  ({summary['seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="where the runs go")
    parser.add_argument("--data_dir", default="data", help="the synthetic world's tfds folder")
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--vqa_steps", type=int, default=0, help="0: the config's epochs")
    args = parser.parse_args()
    main(args.workdir, args.data_dir, args.pretrain_steps, args.vqa_steps)
