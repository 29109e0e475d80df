"""The declared options of every reduction method, without torch.

One declaration per registered method (:data:`METHODS`, keyed by the name it
is registered under): each option's type, default, allowed values or range,
and whether the model builder sets it. Both sides read it:

* the reducer's constructor (``self.option_spec.check(...)``) refuses a bad
  value with the message of :meth:`Option.problem`;
* the workflow's config validation, at DAG build, loads this file by path
  (no torch, no timm, no package imports) and refuses the same value with the
  same message, naming the config key.

The class flags the validator needs (``needs_class_token``, ``fixed_output``,
``needs_grid``) and each method's output count per stage are declared here
too; ``tests/test_config_validation.py`` checks every registered class
against its declaration (signature, defaults, flags, output counts).

This module must stay importable on its own: standard library only.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

#: ATC's (and the clustering back ends') linkages
LINKAGES = ("single", "complete", "average")
#: ATS's quantile grids: the reference code's, or K evenly spaced midpoints
QUANTILE_RULES = ("reference", "midpoint")
#: the heuristic's distance patterns and its shell rules
HEURISTIC_PATTERNS = ("l1", "l2", "linf")
HEURISTIC_RULES = ("reference", "exact")
#: K-Medoids' first-medoid rules and medoid updates
KMEDOIDS_INITS = ("reference", "farthest")
KMEDOIDS_UPDATES = ("reference", "textbook")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: the default of an option without one
REQUIRED = _Required()

_KINDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "grid": "a pair of integers (h, w)",
}


@dataclass(frozen=True)
class Option:
    """One constructor option of a reduction method.

    kind:     "int", "float", "bool", "str" or "grid" (a pair of ints).
    default:  the constructor's default (:data:`REQUIRED` when none); None
              is always allowed where the default is None.
    choices:  the allowed values (strings), () for any.
    minimum:  the smallest allowed value (inclusive), or None.
    above:    a bound the value must exceed (exclusive), or None.
    builder:  True when the model builder sets it (a config must not).
    label:    how messages call it ("ATS quantile_rule"; default its name).
    doc:      one line on what it does.
    """

    kind: str
    default: Any = REQUIRED
    choices: tuple = ()
    minimum: Optional[float] = None
    above: Optional[float] = None
    builder: bool = False
    label: str = ""
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown option kind {self.kind!r}; use one of {', '.join(_KINDS)}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        """What a valid value is, in words (for messages and docs)."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return _KINDS[self.kind] + (" or null" if self.default is None else "")

    def problem(self, name: str, value: Any) -> Optional[str]:
        """Why `value` is not allowed for the option `name`; None when it is."""
        if value is None and self.default is None:
            return None
        if not _is_kind(value, self.kind):
            hint = ""
            if isinstance(value, str) and self.kind == "float" and _is_number_text(value):
                hint = " (YAML reads a number like 1e-3 as text: write 1.0e-3)"
            return f"expected {self.describe()}, got {type(value).__name__} {value!r}{hint}"
        if self.choices and value not in self.choices:
            return f"unknown {self.label or name} {value!r}; use one of {', '.join(self.choices)}"
        if self.minimum is not None and value < self.minimum:
            return f"{name} must be >= {self.minimum}, got {value}"
        if self.above is not None and not value > self.above:
            return f"{name} must be > {self.above}, got {value}"
        return None


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(_is_kind(v, "int") for v in value))


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- output counts
# count(values, num_tokens, budget) -> patch tokens out of one stage, budget a
# models.budget.StageBudget (its .target and .r); values hold every option.


def count_target(values: Mapping[str, Any], num_tokens: int, budget: Any) -> int:
    """Keep or merge down to the stage target (learned methods: num_out is
    set by the builder to this same number)."""
    return min(budget.target, num_tokens)


def count_evit(values: Mapping[str, Any], num_tokens: int, budget: Any) -> int:
    """EViT: the target, plus the fused token when any token is dropped."""
    kept = min(budget.target, num_tokens)
    return kept + int(bool(values["fuse_token"]) and kept < num_tokens)


def count_bipartite(values: Mapping[str, Any], num_tokens: int, budget: Any) -> int:
    """ToMe's bipartite merge: r tokens fewer, at most half of them."""
    return num_tokens - min(budget.r, num_tokens // 2)


def ats_step_count(sample_count: int) -> int:
    """Length of ATS's reference quantile grid for K = `sample_count`: the
    size torch.arange(1/(2K), (2K-1)/(2K), 1/K) takes (computed in double)."""
    k = int(sample_count)
    if k < 1:
        raise ValueError(f"ATS needs a sample count >= 1, got {sample_count}")
    start, end, step = 1 / (2 * k), (2 * k - 1) / (2 * k), 2 / (2 * k)
    return max(0, math.ceil((end - start) / step))


def count_ats(values: Mapping[str, Any], num_tokens: int, budget: Any) -> int:
    """ATS: at most the reference grid's length (K - 1 or K), or the target."""
    if values["quantile_rule"] == "midpoint":
        return min(budget.target, num_tokens)
    return min(ats_step_count(budget.target + 1), num_tokens)


def _sit_hidden_units(values: Mapping[str, Any], dim: int) -> Optional[str]:
    ratio = values["hidden_ratio"]
    if int(dim * ratio) < 1:
        return f"sit hidden_ratio={ratio} leaves no hidden units for dim {dim}"
    return None


def _dynamicvit_channels(values: Mapping[str, Any], dim: int) -> Optional[str]:
    if dim < 4:
        return f"DynamicViT's predictor needs at least 4 channels, got {dim}"
    return None


# ---------------------------------------------------------------- the declarations


@dataclass(frozen=True)
class MethodOptions:
    """What a method takes and how many tokens it outputs.

    options:     option name -> :class:`Option` (the constructor's keyword
                 arguments besides ``dim``).
    count:       ``count(values, num_tokens, budget)`` -> tokens out of a stage.
                 Exact for every method but the heuristic, whose whole-shell
                 count needs the patch grid (the builder checks it).
    dim_check:   ``dim_check(values, dim)`` -> a message when the options do
                 not fit the embedding width `dim`, else None.
    """

    name: str
    options: Mapping[str, Option] = field(default_factory=dict)
    needs_class_token: bool = False
    fixed_output: bool = False
    needs_grid: bool = False
    count: Callable[[Mapping[str, Any], int, Any], int] = count_target
    dim_check: Optional[Callable[[Mapping[str, Any], int], Optional[str]]] = None

    @property
    def builder_options(self) -> tuple[str, ...]:
        return tuple(n for n, o in self.options.items() if o.builder)

    def with_defaults(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` completed with the declared defaults."""
        out = {n: o.default for n, o in self.options.items() if not o.required}
        out.update(values)
        return out

    def problems(self, values: Mapping[str, Any], dim: Optional[int] = None,
                 from_config: bool = True) -> list[tuple[str, str]]:
        """(option name, message) for each value the method refuses ('' as the
        name for a problem of the embedding width). `from_config`: the values
        come from a config, so builder-set options are refused and missing
        required ones reported."""
        problems = []
        for key, value in values.items():
            option = self.options.get(key)
            if option is None:
                known = ", ".join(sorted(n for n, o in self.options.items() if not o.builder)) or "none"
                problems.append((key, f"unknown option of method {self.name!r}{_close(key, self.options)};"
                                      f" its options: {known}"))
            elif from_config and option.builder:
                problems.append((key, f"is set by the model builder for method {self.name!r}; remove it"))
            else:
                message = option.problem(key, value)
                if message:
                    problems.append((key, message))
        for key, option in self.options.items():
            if option.required and key not in values and not (from_config and option.builder):
                problems.append((key, f"method {self.name!r} needs option {key!r}"))
        if not problems and dim is not None and self.dim_check is not None:
            message = self.dim_check(self.with_defaults(values), int(dim))
            if message:
                problems.append(("", message))
        return problems

    def check(self, dim: Optional[int] = None, **values: Any) -> None:
        """The constructor's check: raise ValueError with the first problem."""
        problems = self.problems(values, dim, from_config=False)
        if problems:
            raise ValueError(problems[0][1])

    def output_count(self, values: Mapping[str, Any], num_tokens: int, budget: Any) -> int:
        return int(self.count(self.with_defaults(values), num_tokens, budget))


def _close(word: str, known: Any) -> str:
    import difflib

    match = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _learned_size(what: str) -> dict[str, Option]:
    return {
        "num_out": Option("int", minimum=1, builder=True, doc=f"{what} (the stage target, set by the builder)"),
        "num_in": Option("int", default=None, builder=True, doc="tokens in at build time (informational)"),
    }


def _declare(*specs: MethodOptions) -> dict[str, MethodOptions]:
    return {s.name: s for s in specs}


METHODS: dict[str, MethodOptions] = _declare(
    MethodOptions("topk", needs_class_token=True),
    MethodOptions("evit", {
        "fuse_token": Option("bool", True, doc="fuse the dropped tokens into one, weighted by CLS attention"),
    }, needs_class_token=True, count=count_evit),
    MethodOptions("ats", {
        "quantile_rule": Option("str", "reference", choices=QUANTILE_RULES, label="ATS quantile_rule",
                                doc="the reference code's quantile grid, or K evenly spaced midpoints"),
    }, needs_class_token=True, count=count_ats),
    MethodOptions("tome", count=count_bipartite),
    MethodOptions("tomecis", needs_class_token=True, count=count_bipartite),
    MethodOptions("atc", {
        "linkage": Option("str", "average", choices=LINKAGES, label="linkage",
                          doc="agglomerative clustering linkage"),
    }),
    MethodOptions("kmedoids", {
        "cluster_iters": Option("int", 3, minimum=0, doc="medoid update rounds"),
        "equal_weight": Option("bool", False, doc="ignore the attention each token received"),
        "init": Option("str", "reference", choices=KMEDOIDS_INITS, label="K-Medoids init",
                       doc="first medoids: the reference's rule or farthest-point"),
        "medoid_update": Option("str", "reference", choices=KMEDOIDS_UPDATES, label="K-Medoids medoid_update",
                                doc="the reference's medoid update or the textbook one"),
        "seed": Option("int", 0, doc="seed of the generator drawing the random first medoid"),
        "init_index": Option("int", None, minimum=0, doc="fix the first medoid instead of drawing it"),
    }),
    MethodOptions("dpcknn", {
        "k_neighbors": Option("int", 5, minimum=1, doc="neighbours of the local density"),
        "equal_weight": Option("bool", False, doc="average the tokens instead of a learned score"),
        "size_weighted": Option("bool", False, doc="add log token size to the merge weights"),
    }),
    MethodOptions("patchmerger", {
        **_learned_size("learned queries"),
        "scaled_attention": Option("bool", False, doc="scale the logits by dim ** -0.5"),
    }, fixed_output=True),
    MethodOptions("sit", {
        **_learned_size("output tokens"),
        "hidden_ratio": Option("float", 0.5, doc="hidden width of the slimming MLP, as a fraction of dim"),
    }, fixed_output=True, dim_check=_sit_hidden_units),
    MethodOptions("sinkhorn", {
        **_learned_size("learned centres"),
        "sinkhorn_eps": Option("float", 1.0, above=0, doc="entropic regularisation"),
        "cluster_iters": Option("int", 3, minimum=1, doc="Sinkhorn-Knopp rounds"),
    }, fixed_output=True),
    MethodOptions("dynamicvit", dim_check=_dynamicvit_channels),
    MethodOptions("heuristic", {
        "pattern": Option("str", "l2", choices=HEURISTIC_PATTERNS, label="heuristic pattern",
                          doc="distance from the grid centre"),
        "grid_size": Option("grid", None, builder=True, doc="(h, w) of the patch grid, set by the builder"),
        "rule": Option("str", "reference", choices=HEURISTIC_RULES, label="heuristic rule",
                       doc="whole shells as the reference, or exactly the target"),
    }, needs_grid=True),
)


def method_options(name: str) -> MethodOptions:
    """The declaration of the method registered as `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"no option declaration for reduction method {name!r}{_close(name, METHODS)};"
                         f" declared: {', '.join(sorted(METHODS))}") from None


__all__ = ["LINKAGES", "METHODS", "MethodOptions", "Option", "REQUIRED", "method_options"]
