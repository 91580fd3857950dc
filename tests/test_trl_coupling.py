"""CRRLTrainer against the installed TRL: the coupling that a TRL upgrade can break silently.

CRRLTrainer subclasses `trl.GRPOTrainer` without running `GRPOTrainer.__init__`; `CRRLTrainer._init_grpo_state`
sets the attributes that the GRPOTrainer methods CRRL inherits read. These tests read those methods' source in the
installed TRL (inspect + ast), collect every `self.<name>` they read, and check that a freshly built CRRLTrainer has
each one. A failure names the attribute and the methods that read it: set it in `_init_grpo_state` (with a comment
saying which method reads it), or, when only a path CRRL cannot take reads it, add it to ALLOWED_MISSING below with
the reason. See docs/scaling.md, "Moving TRL's pin".
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from functools import lru_cache

import pytest
import transformers
from datasets import Dataset

from conftest import ITEMS, tiny_embedder
from trl import GRPOTrainer
from trl.trainer.base_trainer import _BaseTrainer

from reaemb_trl.candidates import CooccurrenceCandidates
from reaemb_trl.crrl_config import CRRLConfig
from reaemb_trl.crrl_trainer import CRRLTrainer

# ---- what a built CRRLTrainer may lack, and why ---------------------------------------------------------------------
# Methods of GRPOTrainer that CRRL inherits but never runs: their only callers are GRPOTrainer methods that CRRL
# overrides (or other methods in this list). `test_unreached_methods_are_unreached` checks that claim on the
# installed TRL, so a TRL release that starts calling one of them from a method CRRL does run fails there.
UNREACHED_METHODS = {
    "_calculate_rewards": "TRL's text-reward call; only GRPOTrainer._generate_and_score_completions calls it",
    "_generate": "text generation; only GRPOTrainer._generate_and_score_completions calls it",
    "_generate_single_turn": "text generation (transformers / vLLM / continuous batching); called by _generate, "
                             "_tool_call_loop",
    "_tool_call_loop": "tool calling; called by _generate",
    "_tokenize_prompts": "prompt tokenisation (chat templates, environments); called by _generate",
    "_get_tool_suffix_ids": "tool calling; called by _tool_call_loop",
    "_get_per_token_logps_and_entropies": "per-token LM log-probs; called by GRPOTrainer._generate_and_score_"
                                          "completions and GRPOTrainer._compute_loss",
    "get_high_entropy_mask": "entropy masking of tokens; called by GRPOTrainer._compute_loss",
    "get_off_policy_mask": "off-policy token masking (a staticmethod); called by GRPOTrainer._compute_loss",
    "get_gamma_weights": "discounting of multi-turn tokens (a staticmethod); called by GRPOTrainer._compute_loss",
}

UNREACHED = "read only by methods in UNREACHED_METHODS"
TRAINER_LOOP = "assigned by transformers.Trainer's training loop before it calls training_step"

# attribute -> reason. Reasons starting with UNREACHED / TRAINER_LOOP are checked by test_allow_list_is_current.
ALLOWED_MISSING = {
    # training_step divides `_step` by it; CRRL's _compute_loss reads it too. Trainer sets it per accumulation cycle.
    "current_gradient_accumulation_steps": TRAINER_LOOP,
    # vLLM: CRRLConfig rejects use_vllm; CRRL sets use_vllm = False for the methods that test it.
    "vllm_generation": UNREACHED + " (vLLM)",
    "vllm_mode": UNREACHED + " (vLLM)",
    "_last_loaded_step": UNREACHED + " (vLLM weight sync)",
    # transformers generation: CRRL's actions are latent vectors, not tokens.
    "generation_config": UNREACHED + " (text generation)",
    "generation_kwargs": UNREACHED + " (text generation)",
    "eos_token_ids": UNREACHED + " (text generation)",
    "pad_to_multiple_of": UNREACHED + " (text generation)",
    "use_transformers_continuous_batching": UNREACHED + " (text generation)",
    "continuous_batching_config": UNREACHED + " (text generation)",
    "_tokenizer": UNREACHED + " (text generation; CRRL tokenises with its ItemPromptFormatter)",
    "_dist": UNREACHED + " (text generation across processes)",
    "chat_template": UNREACHED + " (chat-template prompts; CRRL's prompt format is its ItemPromptFormatter)",
    "chat_template_kwargs": UNREACHED + " (chat-template prompts and TRL's text rewards)",
    # multimodal prompts: CRRL's items are text attributes.
    "_is_vlm": UNREACHED + " (multimodal)",
    "_image_pad_token_id": UNREACHED + " (multimodal)",
    "_video_pad_token_id": UNREACHED + " (multimodal)",
    # tools and environments: CRRL sets tools = [] and environments = None for the methods it does run.
    "_env_tools": UNREACHED + " (environments)",
    "_batch_environments": UNREACHED + " (environments)",
    "_async_tool_dicts": UNREACHED + " (tools)",
    "_sync_tool_dicts": UNREACHED + " (tools)",
    "max_tool_calling_iterations": UNREACHED + " (tools)",
    "async_loop": UNREACHED + " (async tools and async reward functions)",
}


# ---- reading the installed TRL ----------------------------------------------------------------------------------------
def _function(obj):
    if isinstance(obj, (staticmethod, classmethod)):
        return obj.__func__
    if isinstance(obj, property):
        return obj.fget
    return obj if inspect.isfunction(obj) else None


def _classes_above_grpo() -> tuple[type, ...]:
    """CRRLTrainer and its mixins: the classes before GRPOTrainer in the MRO."""
    mro = CRRLTrainer.__mro__
    return mro[: mro.index(GRPOTrainer)]


def _classes_below_grpo() -> tuple[type, ...]:
    """What GRPOTrainer builds on (_BaseTrainer, transformers.Trainer), whose __init__ CRRL does run."""
    mro = CRRLTrainer.__mro__
    return tuple(c for c in mro[mro.index(GRPOTrainer) + 1 :] if c is not object)


@lru_cache(maxsize=None)
def inherited_methods() -> dict[str, object]:
    """GRPOTrainer's own methods that neither CRRLTrainer nor its mixins define."""
    above = _classes_above_grpo()
    out = {}
    for name, obj in vars(GRPOTrainer).items():
        func = _function(obj)
        if func is not None and not any(name in vars(cls) for cls in above):
            out[name] = func
    return out


@lru_cache(maxsize=None)
def _tree(func) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(func)))


def self_reads(func) -> set[str]:
    """Names `n` of every `self.n` the function loads (nested functions and lambdas included)."""
    return {
        node.attr
        for node in ast.walk(_tree(func))
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
        and isinstance(node.value, ast.Name) and node.value.id == "self"
    }


def self_stores(func) -> set[str]:
    return {
        node.attr
        for node in ast.walk(_tree(func))
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name) and node.value.id == "self"
    }


def hasattr_guarded(func) -> set[str]:
    """Names the function tests with `hasattr(self, "n")`: it copes with their absence itself."""
    return {
        node.args[1].value
        for node in ast.walk(_tree(func))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
        and len(node.args) == 2 and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"
        and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
    }


def required_reads() -> dict[str, set[str]]:
    """attribute -> the inherited methods that read it (hasattr-guarded reads left out)."""
    readers: dict[str, set[str]] = {}
    for name, func in inherited_methods().items():
        for attr in self_reads(func) - hasattr_guarded(func):
            readers.setdefault(attr, set()).add(name)
    return readers


def reached_methods() -> set[str]:
    """Inherited methods that can run in a CRRLTrainer: those Trainer calls (it defines or calls a method of that
    name) or CRRL's own code reads, and whatever they read in turn."""
    inherited = inherited_methods()
    roots: set[str] = set()
    for cls in _classes_below_grpo() + _classes_above_grpo():
        for name, obj in vars(cls).items():
            func = _function(obj)
            if func is None:
                continue
            if cls in _classes_below_grpo() and name in inherited:
                roots.add(name)  # a Trainer hook that GRPOTrainer overrides
            try:
                roots |= self_reads(func) & set(inherited)
            except (OSError, TypeError, SyntaxError):  # no source (C functions, generated code)
                continue
    reached, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += [m for m in self_reads(inherited[name]) & set(inherited) if m not in reached]
    return reached


# ---- a built trainer --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    catalogue = {str(i): [{"key": k, "value": v} for k, v in item] for i, item in enumerate(ITEMS)}
    sequences = {"u0": ["0", "1", "2", "3", "4"], "u1": ["1", "2", "5", "0", "3"], "u2": ["3", "4", "5", "2", "1"]}
    index = CooccurrenceCandidates.from_sequences(sequences, list(catalogue), candidate_num=4, pos_num=1, seed=0)
    args = CRRLConfig(
        output_dir=str(tmp_path_factory.mktemp("crrl")), per_device_train_batch_size=8, num_generations=4,
        candidate_num=4, max_steps=1, use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    dataset = Dataset.from_list([{"item_id": k, "attributes": v} for k, v in catalogue.items()])
    return CRRLTrainer(tiny_embedder(), args, train_dataset=dataset, candidates=index)


# ---- the tests --------------------------------------------------------------------------------------------------------
def test_inherited_methods_find_their_attributes(trainer):
    missing = {
        attr: methods for attr, methods in required_reads().items()
        if attr not in ALLOWED_MISSING and not hasattr(trainer, attr)
    }
    assert not missing, (
        "CRRLTrainer lacks attributes that GRPOTrainer methods it inherits read (installed TRL "
        f"{__import__('trl').__version__}):\n"
        + "\n".join(f"  self.{attr}: read by {', '.join(sorted(m))}" for attr, m in sorted(missing.items()))
        + "\nSet them in CRRLTrainer._init_grpo_state (comment which method reads them), or, if only a path CRRL "
        "cannot take reads them, add them to ALLOWED_MISSING in tests/test_trl_coupling.py with the reason."
    )


def test_unreached_methods_are_unreached():
    inherited, reached = inherited_methods(), reached_methods()
    gone = sorted(set(UNREACHED_METHODS) - set(inherited))
    assert not gone, f"UNREACHED_METHODS names methods that are no longer inherited from GRPOTrainer: {gone}"
    now_reached = sorted(set(UNREACHED_METHODS) & reached)
    assert not now_reached, (
        f"GRPOTrainer methods listed as never run by CRRL are reachable from methods CRRL runs: {now_reached}. "
        "Check what calls them in the installed TRL; the attributes they read must then exist on CRRLTrainer."
    )


def test_allow_list_is_current(trainer):
    readers = required_reads()
    stale = sorted(a for a in ALLOWED_MISSING if a not in readers or hasattr(trainer, a))
    assert not stale, f"ALLOWED_MISSING entries no longer needed (not read, or now set): {stale}; remove them"
    reached = reached_methods()
    trainer_stores = set().union(*(self_stores(f) for cls in _classes_below_grpo()
                                   for f in map(_function, vars(cls).values()) if f is not None))
    wrong = []
    for attr, reason in ALLOWED_MISSING.items():
        if reason.startswith(UNREACHED) and readers[attr] & reached:
            wrong.append(f"self.{attr} is read by {sorted(readers[attr] & reached)}, which CRRL runs")
        if reason == TRAINER_LOOP and attr not in trainer_stores:
            wrong.append(f"self.{attr} is not assigned by transformers.Trainer / _BaseTrainer any more")
    assert not wrong, "ALLOWED_MISSING reasons that no longer hold:\n  " + "\n  ".join(wrong)


def test_crrl_overrides_the_text_specific_methods():
    own = vars(CRRLTrainer)
    for name in ("_generate_and_score_completions", "_compute_loss"):
        assert name in own, f"CRRLTrainer must override GRPOTrainer.{name} (GRPOTrainer's works on text tokens)"
        assert hasattr(GRPOTrainer, name), f"GRPOTrainer.{name} is gone: TRL's private contract changed"
    # TRL's _calculate_rewards(inputs, prompts, completions, completion_ids_list) takes text; CRRL's latent rewards
    # take other arguments, so reusing the name would let TRL code call it with the wrong ones.
    assert not any("_calculate_rewards" in vars(cls) for cls in _classes_above_grpo())
    assert "_latent_rewards" in own
    # __init__ is CRRL's own; GRPOTrainer.__init__ must not run (it builds text-generation machinery).
    assert "__init__" in own and "_init_grpo_state" in own


def test_trainer_base_is_what_crrl_initialises():
    """CRRLTrainer.__init__ calls `_BaseTrainer.__init__` directly: GRPOTrainer must still sit right above it."""
    assert GRPOTrainer.__bases__ == (_BaseTrainer,)
    assert issubclass(_BaseTrainer, transformers.Trainer)
