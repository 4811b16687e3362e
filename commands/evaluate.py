"""``train.py evaluate``: the STS suite (SimCSE's protocol) or MTEB tasks over a checkpoint, an export or a
hub model, printed as a table and written as JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

from jsonargparse import ArgumentParser

from core.errors import DataError
from datamodules.sts import STS_TASKS, TEXT_FORMS
from evaluation import evaluate_mteb as em
from evaluation.evaluate import KNOWN_TASKS, format_table, load_embedder, load_tasks, parse_tasks, score_tasks, to_json
from evaluation.mteb_eval import benchmark_tasks, get_task


def is_mteb_selection(tasks: str, benchmark: str | None) -> bool:
    """Whether ``--tasks`` / ``--benchmark`` ask for MTEB tasks (MTEB names, not this file's STS names); a mix of
    the two kinds is refused in one line."""
    if benchmark is not None:
        if tasks != ",".join(STS_TASKS):  # --tasks was given too
            raise DataError("give --benchmark or --tasks, not both")
        return True
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    ours = [n for n in names if n in KNOWN_TASKS or n.endswith(".tsv")]
    if ours and len(ours) != len(names):
        raise DataError(f"--tasks mixes this project's STS names ({', '.join(ours)}) with MTEB names "
                        f"({', '.join(n for n in names if n not in ours)}): run them separately")
    return not ours and bool(names)


def evaluate_main(argv: list[str]) -> dict:
    """``evaluate --model M [--tasks T,...] [--data_root DIR] [--output FILE]``: the SimCSE STS table; with MTEB
    task names (``--tasks STSBenchmark,SICK-R``) or ``--benchmark NAME``, those MTEB tasks through ``mteb.evaluate``
    (:mod:`evaluation.evaluate_mteb`: TaskResults kept in a ``ResultCache`` folder, an export's card updated).
    """

    parser = ArgumentParser(prog="train.py evaluate", description=evaluate_main.__doc__)
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help="a .ckpt written by `train.py fit`, a sentence-transformers / Hugging Face folder, "
        "or a hub name",
    )
    parser.add_argument(
        "--tasks",
        type=str,
        default=",".join(STS_TASKS),
        help=f"comma-separated: {', '.join(KNOWN_TASKS)}, or .tsv paths (the SimCSE STS table); or MTEB task "
        "names, e.g. STSBenchmark,SICK-R (offline: the STS tasks whose data is under --data_root)",
    )
    parser.add_argument("--benchmark", type=str | None, default=None, help="an MTEB benchmark by name")
    parser.add_argument("--prompts", type=dict[str, str] | None, default=None,
                        help="MTEB tasks: text put before the inputs, by MTEB prompt key, e.g. "
                        '\'{"query": "query: ", "document": "passage: "}\' (default: the model\'s own prompts)')
    parser.add_argument("--results_dir", type=str | None, default=None,
                        help="MTEB tasks: the ResultCache folder for the TaskResults (default: <export>/mteb, "
                        "<run folder>/mteb for a checkpoint)")
    parser.add_argument(
        "--data_root",
        type=str,
        default=None,
        help="folder with stsb/, sts12-16/, sick/ (see datamodules/sts.py); without it the hub "
        "copies are used",
    )
    parser.add_argument(
        "--text",
        type=str,
        default="senteval",
        choices=TEXT_FORMS,
        help="text form: senteval (SimCSE's data), mteb (MTEB's copies), raw (organisers' files)",
    )
    parser.add_argument("--output", type=str, default=None, help="JSON file to write")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--max_length", type=int, default=None, help="tokens per sentence; default: the model's own"
    )
    parser.add_argument("--device", type=str, default="auto")
    args = parser.parse_args(argv)

    if is_mteb_selection(args.tasks, args.benchmark):
        return evaluate_mteb_main(args)
    tasks = parse_tasks(args.tasks)  # fail on a bad name before loading anything
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise DataError(f"--data_root {args.data_root!r} is not a folder")
    start = time.perf_counter()
    embedder = load_embedder(args.model, args.batch_size, args.max_length, args.device)  # refuses an SAE at once
    scores, emb = score_tasks(embedder, load_tasks(tasks, args.data_root, args.text))
    result = to_json(scores, args.model, args.data_root, time.perf_counter() - start, args.text)
    result.update(n_sentences=len(emb), encode_seconds=emb.seconds)
    print(format_table(scores))
    print(
        f"({result['seconds']:.1f} s; 'all': Spearman x100 over every pair of a task; 'wmean': mean over its "
        "subsets weighted by size)"
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1, allow_nan=False))
        print(f"wrote {args.output}")
    return result


def evaluate_mteb_main(args) -> dict:
    """The MTEB branch of :func:`evaluate_main` (``args``: its parsed options)."""
    names = benchmark_tasks(args.benchmark) if args.benchmark else [t.strip() for t in args.tasks.split(",")
                                                                     if t.strip()]
    for name in names:
        get_task(name)  # an unknown name fails before the model loads
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise DataError(f"--data_root {args.data_root!r} is not a folder")
    start = time.perf_counter()
    embedder = load_embedder(args.model, args.batch_size, args.max_length, args.device)
    results, folder = em.run_mteb(args.model, embedder, names, args.data_root, args.results_dir, args.prompts,
                                  args.batch_size)
    print(em.summary(results))
    print(f"({time.perf_counter() - start:.1f} s; TaskResults in {folder}, read by mteb.ResultCache)")
    record = em.to_json(results, args.model, folder)
    model_dir = Path(args.model).expanduser()
    if model_dir.is_dir():
        card = em.update_card(model_dir, results, folder)
        if card is not None:
            print(f"updated the card's model-index: {card}")
    if args.output:
        em.dump(record, args.output)
        print(f"wrote {args.output}")
    return record
