"""Method studies, run from the repository root as modules (`python -m experiments.crrl_ablation ...`), so that the
scripts share `experiments.pipeline` without path edits. Not part of the installed package."""
