"""Compare item tables: check every argument, train one downstream model per (table, seed) - in worker processes
if asked, keeping each finished run on disk - combine the score ensembles (`ensemble`), then aggregate and test
(`report.aggregate`)."""

from __future__ import annotations

import sys
from pathlib import Path

from reaemb_trl.evaluation.config import (
    ENSEMBLE, FIXED_TABLES, MOSTPOP, TABLE_MODES, EvalConfig, RunResult, TableSpec,
)
from reaemb_trl.evaluation.ensemble import ensemble_parts
from reaemb_trl.evaluation.significance import default_pairs
from reaemb_trl.evaluation.training import train_and_evaluate


def spec_name(stem: str, mode: str) -> str:
    """A table file's row name: its stem (frozen), `id+stem` (ensemble), `stem@mode` (other modes)."""
    return stem if mode == "frozen" else f"id+{stem}" if mode == ENSEMBLE else f"{stem}@{mode}"


def table_specs(tables, modes=None) -> list[TableSpec]:
    """TableSpecs from "id", "mostpop", paths or TableSpecs. Each file runs once per mode in `modes` (default
    frozen; "ensemble" adds the score ensemble of id and the file's frozen run); names per `spec_name`; repeated
    names get a numeric suffix."""
    modes = list(modes or ["frozen"])
    specs: list[TableSpec] = []
    names: set[str] = set()
    for entry in tables:
        if isinstance(entry, TableSpec):
            candidates = [entry]
        elif entry in FIXED_TABLES:
            candidates = [TableSpec(entry, entry)]
        else:
            stem = Path(entry).stem
            candidates = [TableSpec(spec_name(stem, mode), str(entry), mode) for mode in modes]
        for spec in candidates:
            name, n = spec.name, 2
            while name in names:
                name, n = f"{spec.name}_{n}", n + 1
            names.add(name)
            specs.append(TableSpec(name, spec.source, spec.mode))
    return specs


def seed_list(seeds) -> list[int]:
    """A count (0..n-1, n >= 1) or a non-empty list of seeds."""
    listed = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not listed:
        raise ValueError(f"seeds must be a count >= 1 or a non-empty list, got {seeds!r}")
    return listed


def check_table_files(specs: list[TableSpec], item_ids: list[str]) -> dict[str, str]:
    """Every table file covers the catalogue with finite rows, and every mode exists: checked before any run
    trains, so a bad table never costs the runs before it. Returns {file: sha256}."""
    import torch

    from reaemb_trl.evaluation.run_store import file_digest
    from reaemb_trl.evaluation.tables import load_embedding_file

    digests: dict[str, str] = {}
    for spec in specs:
        if spec.source in FIXED_TABLES:
            continue
        if spec.mode not in TABLE_MODES + (ENSEMBLE,):
            raise ValueError(f"table {spec.name!r}: mode {spec.mode!r} is not one of {TABLE_MODES + (ENSEMBLE,)}")
        if spec.source in digests:
            continue
        rows = load_embedding_file(spec.source, item_ids)  # TableError naming the file: missing, unreadable, partial
        bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{spec.source}: {len(bad)} of {len(item_ids)} rows hold NaN or inf values, e.g. items "
                             f"{[item_ids[i] for i in bad[:5]]}; re-export the table")
        digests[spec.source] = file_digest(spec.source)
    return digests


def _run_job(job) -> tuple[int, RunResult]:
    """One (table, seed) run in a worker process with its share of the CPU threads."""
    index, split, spec, config, seed, keep_scoring, threads = job
    import torch

    torch.set_num_threads(threads)
    return index, train_and_evaluate(split, spec, config, seed, progress=False, keep_scoring=keep_scoring)


def compare_tables(dataset, tables, seeds=1, config: EvalConfig | None = None, progress: bool = True,
                   compare=(), modes=None, baseline_pairs: bool = True, workers: int = 1,
                   runs_dir: str | Path | None = None) -> dict:
    """Train and test `config.model` once per (table, seed) on the same split, aggregate the results and run the
    paired tests (`significance.default_pairs` - unless `baseline_pairs` is False - plus the `compare` pairs,
    "A:B" or (A, B)).

    dataset: a RecDataset or a canonical folder path. tables: "id", "mostpop", .safetensors paths or TableSpecs
    (files run once per mode in `modes`; mode "ensemble" adds the score ensemble of id and the file's frozen run,
    `evaluation.ensemble`, made from those runs without training). seeds: a count (0..n-1) or a list. MostPop is
    deterministic and runs once. `config.cold_items` > 0 holds a seeded share of the catalogue out of training
    (`data.cold`) and reports the users whose target is one of them as the `cold_item` group.
    Every argument (seeds, comparison names, each table file's rows) is checked before the first run.
    `workers` > 1 runs that many (table, seed) jobs at once in worker processes, splitting the CPU threads between
    them (the small matmuls of these models use one core badly; on 2 cores, 2 workers are ~1.7x faster); the
    results do not depend on the schedule. `runs_dir`: keep each finished run there (`run_store.RunStore`) and
    resume from the runs it holds; a folder made with other settings is refused. Returns the dict written to
    results.json (per-user test ranks under each table's `test_ranks`)."""
    from tqdm.auto import tqdm

    from reaemb_trl.data.canonical import RecDataset
    from reaemb_trl.data.cold import cold_item_ids
    from reaemb_trl.evaluation.ensemble import ensemble_run
    from reaemb_trl.evaluation.report import aggregate
    from reaemb_trl.evaluation.run_store import RunStore, dataset_digest
    from reaemb_trl.evaluation.split import leave_one_out

    config = config or EvalConfig()
    if not isinstance(dataset, RecDataset):
        dataset = RecDataset.load(dataset)
    seeds = seed_list(seeds)
    specs = table_specs(tables, modes)
    compare = list(compare)
    parts = ensemble_parts(specs)
    default_pairs([spec.name for spec in specs], compare, baseline_pairs, references=list(parts))  # names checked now
    digests = check_table_files(specs, dataset.item_ids)

    def source_digest(spec: TableSpec) -> str:  # what a finished run of `spec` must have been made from
        return digests.get(spec.source, spec.source)

    split = leave_one_out(dataset, cold_item_ids(dataset.item_ids, config.cold_items, config.cold_item_seed))
    jobs = [(spec, seed) for spec in specs if spec.name not in parts
            for seed in (seeds[:1] if spec.source == MOSTPOP else seeds)]
    scored = {part.name for pair in parts.values() for part in pair}  # runs whose scoring an ensemble needs
    ensembles = [(spec, seed) for spec in specs if spec.name in parts for seed in seeds]
    results: list[RunResult | None] = [None] * len(jobs)
    combined: list[RunResult | None] = [None] * len(ensembles)
    store = None
    if runs_dir is not None:
        store = RunStore(runs_dir, {
            "config": config.as_dict(), "training_dtype": str(config.training_dtype()),  # what `auto` meant here
            "dataset": dataset_digest(dataset)})
        combined = [store.load(spec, seed, source_digest(spec)) for spec, seed in ensembles]
        missing = {(part.name, seed) for (spec, seed), r in zip(ensembles, combined) if r is None
                   for part in parts[spec.name]}
        results = [store.load(spec, seed, source_digest(spec), scoring=(spec.name, seed) in missing)
                   for spec, seed in jobs]
        done = sum(r is not None for r in results)
        if done:
            print(f"resuming: {done} of {len(jobs)} runs already finished in {store.folder}", file=sys.stderr)
    pending = [n for n, r in enumerate(results) if r is None]

    def finished(index: int, result: RunResult) -> None:
        results[index] = result
        if store is not None:
            store.save(*jobs[index], result, source_digest(jobs[index][0]))

    if workers <= 1 or len(pending) <= 1:
        for index in tqdm(pending, desc="runs", disable=not progress):
            spec, seed = jobs[index]
            finished(index, train_and_evaluate(split, spec, config, seed, progress, keep_scoring=spec.name in scored))
    else:
        import multiprocessing

        import torch

        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        with context.Pool(workers) as pool:
            work = [(n, split, jobs[n][0], config, jobs[n][1], jobs[n][0].name in scored, threads) for n in pending]
            # unordered: a run is kept on disk as soon as it ends, whatever the order of the others
            for index, result in tqdm(pool.imap_unordered(_run_job, work), total=len(work),
                                      desc=f"runs ({workers} workers)", disable=not progress):
                finished(index, result)
            pool.close()  # let the workers exit on their own (leaving the block would terminate them)
            pool.join()
    by_run = {(spec.name, seed): result for (spec, seed), result in zip(jobs, results)}
    for n, (spec, seed) in enumerate(ensembles):
        if combined[n] is None:
            id_spec, table_spec = parts[spec.name]
            combined[n] = ensemble_run(split, spec, config, by_run[id_spec.name, seed], by_run[table_spec.name, seed])
            if store is not None:
                store.save(spec, seed, combined[n], source_digest(spec))
    runs: dict[str, list[RunResult]] = {spec.name: [] for spec in specs}
    for (spec, _), result in zip(jobs + ensembles, results + combined):
        result.scoring = None  # served the ensembles; not part of the results
        runs[spec.name].append(result)
    return aggregate(runs, config, split, specs, compare, baseline_pairs)
