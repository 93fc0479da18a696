"""The base run configuration both kinds extend, and the loader: YAML presets, ``key=value`` overrides.

A kind's config (``diffusion.config.RaftConfig``, ``llm.config.LLMConfig``) is a :class:`BaseConfig`
subclass: nested dataclasses whose fields carry a one-line ``help``. The base holds what the stage loop
reads (seed, stages, mode, prompts, ranking, early stop, the sampling/eval sizes) and checks it in
:meth:`BaseConfig.validate`; a kind adds its own sections and rules in ``check``.
``load_config(path, overrides, cls)`` is the only entry point a CLI needs; unknown keys fail with the
nearest valid key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .early_stop import EarlyStopper
from .errors import ConfigError
from .ranking import MODES


def option(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:
    """A dataclass field with a help line (mutable defaults go through a factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class PromptsConfig:
    train: Any = option(None, "training prompts: a list or a text file (one per line)")
    eval: Any = option(None, "held-out prompts (same forms); null = the training prompts")
    per_stage: int | None = option(None, "prompts drawn per stage (RAFT's b); null = all training prompts every stage")


@dataclass
class RankingConfig:
    mode: str = option("local", "local: best top_k per prompt; global: best top_ratio of the stage; threshold: reward >= threshold")
    top_k: int = option(1, "samples kept per prompt in local mode")
    top_ratio: float = option(0.125, "fraction of all samples kept in global mode")
    threshold: float = option(0.0, "minimum ranking key kept in threshold mode")
    max_kept: int | None = option(None, "after the mode's selection keep at most this many, best first")
    kl_beta: float = option(0.0, "rank by r - beta*log(p/p_base), the log-ratio the task supplies (base = the model with its adapter off)")
    skip_top: int = option(
        0,
        "local mode: leave each prompt's best N samples by ranking key out of the pick (neither kept nor negatives) and keep the next top_k: a proxy reward parts from what it stands for most in its far tail, so this trades some reward per stage for more of the true quality per unit of reward (docs/ranking-and-training.md); 0 = off",
    )
    replay_top_k: int = option(
        0,
        "online mode: also train each stage on the best N per prompt, by reward, of the samples earlier stages of the run kept (a replay of the best so far, read back from their stage folders); 0 = off",
    )


@dataclass
class EarlyStopConfig:
    patience: int | None = option(None, "stop when early_stop.metric has not improved for this many stages; null = no patience rule")
    metric: str = option("eval_reward_mean", "metrics.jsonl key watched by patience and used to pick the best stage for final/")
    min_delta: float = option(0.0, "an improvement must exceed this to reset patience")
    target_rise_sd: float | None = option(
        None,
        "stop at the first evaluated stage, above the floors, whose early_stop.metric has risen by this many of the base model's per-sample stds (eval_reward_std for eval_reward_mean), e.g. 1.0; final/ = that stage. With eval.screen_per_prompt the stages between evaluations are screened and one near the target is evaluated at once; null = no target",
    )
    floor_patience: int = option(
        1,
        "stop only when this many evaluated stages in a row are under a floor (the kind's min_..._ratio settings); a stage under one is then followed by a full evaluation of the next, and final/ is still the best stage above the floors. 1 = stop at the first stage under a floor; 2 rides out a dip under a floor that one evaluation reads and the next does not",
    )
    screen_band_se: float = option(
        2.0,
        "with early_stop.target_rise_sd and eval.screen_per_prompt: a screened stage is evaluated in full when its estimate of the held-out metric plus this many of the estimate's standard errors reaches the target (fewer: fewer full evaluations that fall short, more stages at the target missed by their screen)",
    )


Need = Callable[[bool, str], None]


def need(cond: bool, msg: str) -> None:
    """Raise a ConfigError with ``msg`` (which names the key and the fix) unless ``cond`` holds."""
    if not cond:
        raise ConfigError(msg)


@dataclass
class BaseConfig:
    """What every RAFT run has: seed, stages, mode, and the shared rules of one validation.

    A subclass declares its sections, in the order users read them, with classes that extend the ones
    here: ``prompts`` (:class:`PromptsConfig`), ``ranking`` (:class:`RankingConfig`), ``early_stop``
    (:class:`EarlyStopConfig`), plus ``sampling`` (num_per_prompt, batch_size, external_pool), ``eval``
    (num_per_prompt, every), ``reward`` (a mapping) and ``progress`` (bool), all of which the loop reads.
    """

    seed: int = option(0, "run seed: every sample's seed derives from it")
    num_stages: int = option(10, "RAFT stages (sample, rank, fine-tune)")
    mode: str = option("online", "online: sample from the current model each stage; offline: one pool from the base model")

    sample_noun: ClassVar[str] = "samples"  # what one generated output is called in messages
    example_reward: ClassVar[str] = "brightness"
    max_stage_samples: ClassVar[int] = 1_000_000  # more than one stage's pool (records, candidates) should hold

    def __post_init__(self):
        fill_sections(self)

    def validate(self):
        """Every rule in one place: the shared ones here, the kind's own in :meth:`check`."""
        s, r, e, es = self.sampling, self.ranking, self.eval, self.early_stop
        need(isinstance(self.num_stages, int) and self.num_stages >= 1, f"num_stages must be an integer >= 1 (got {self.num_stages!r})")
        need(self.mode in ("online", "offline"), f"mode must be 'online' or 'offline' (got {self.mode!r})")
        need(s.num_per_prompt >= 1, f"sampling.num_per_prompt must be >= 1 (got {s.num_per_prompt})")
        need(s.batch_size >= 1, f"sampling.batch_size must be >= 1 (got {s.batch_size})")
        need(self.prompts.per_stage is None or self.prompts.per_stage >= 1, "prompts.per_stage must be >= 1 or null")
        need(r.mode in MODES, f"ranking.mode must be one of {', '.join(MODES)} (got {r.mode!r})")
        need(r.top_k >= 1, f"ranking.top_k must be >= 1 (got {r.top_k})")
        if r.mode == "local" and s.external_pool is None:
            need(
                r.top_k <= s.num_per_prompt,
                f"ranking.top_k={r.top_k} keeps more than the sampling.num_per_prompt={s.num_per_prompt} {self.sample_noun} "
                "generated per prompt; lower ranking.top_k or raise sampling.num_per_prompt",
            )
        need(
            isinstance(r.skip_top, int) and not isinstance(r.skip_top, bool) and r.skip_top >= 0,
            f"ranking.skip_top must be an integer >= 0 (got {r.skip_top!r})",
        )
        need(
            not r.skip_top or r.mode == "local",
            f"ranking.skip_top leaves out each prompt's best samples, so it needs ranking.mode=local (got {r.mode!r}); set ranking.skip_top=0",
        )
        if r.skip_top and s.external_pool is None:
            need(
                r.top_k + r.skip_top < s.num_per_prompt,
                f"ranking.skip_top={r.skip_top} with ranking.top_k={r.top_k} leaves out and keeps all the sampling.num_per_prompt="
                f"{s.num_per_prompt} {self.sample_noun} of a prompt; lower ranking.skip_top or raise sampling.num_per_prompt",
            )
        need(0 < r.top_ratio <= 1, f"ranking.top_ratio must be in (0, 1] (got {r.top_ratio})")
        need(r.max_kept is None or r.max_kept >= 1, "ranking.max_kept must be >= 1 or null")
        need(r.kl_beta >= 0, "ranking.kl_beta must be >= 0")
        need(
            not r.kl_beta or (self.mode == "online" and getattr(s, "external_pool", None) is None),
            f"ranking.kl_beta weighs each stage's {self.sample_noun} against the base, and an offline run (mode=offline or "
            "sampling.external_pool) picks once, at stage 1, where the model is the base: set ranking.kl_beta=0",
        )
        need(
            isinstance(r.replay_top_k, int) and r.replay_top_k >= 0,
            f"ranking.replay_top_k must be an integer >= 0 (got {r.replay_top_k!r})",
        )
        need(
            not r.replay_top_k or (self.mode == "online" and getattr(s, "external_pool", None) is None),
            "ranking.replay_top_k replays earlier stages' kept samples; an offline run (mode=offline or "
            "sampling.external_pool) trains on one pool every stage: set ranking.replay_top_k=0",
        )
        need(e.num_per_prompt >= 1 and e.every >= 0, "eval.num_per_prompt must be >= 1 and eval.every >= 0")
        need(es.patience is None or es.patience >= 1, f"early_stop.patience must be >= 1 or null (got {es.patience})")
        need(
            isinstance(es.floor_patience, int) and es.floor_patience >= 1,
            f"early_stop.floor_patience must be an integer >= 1 (got {es.floor_patience!r})",
        )
        floors = self.floor_settings()
        need(
            es.floor_patience == 1 or any(r is not None for *_, r in floors),
            f"early_stop.floor_patience={es.floor_patience} counts evaluated stages under a floor, but no floor is set: "
            f"set {' or '.join('early_stop.' + k for k, *_ in floors) or 'a floor'}, or leave early_stop.floor_patience at 1",
        )
        need(es.min_delta >= 0, f"early_stop.min_delta must be >= 0 (got {es.min_delta})")
        need(
            es.target_rise_sd is None or (isinstance(es.target_rise_sd, (int, float)) and es.target_rise_sd > 0),
            f"early_stop.target_rise_sd must be > 0 or null (got {es.target_rise_sd!r})",
        )
        need(
            es.target_rise_sd is None or (isinstance(es.metric, str) and es.metric.endswith("_mean")),
            f"early_stop.target_rise_sd measures a rise in base stds, so early_stop.metric must be a mean such as eval_reward_mean (got {es.metric!r})",
        )
        screen = getattr(e, "screen_per_prompt", 0)
        need(
            isinstance(screen, int) and 0 <= screen <= e.num_per_prompt and screen != 1,
            f"eval.screen_per_prompt must be 0 (off) or 2 .. eval.num_per_prompt={e.num_per_prompt} (got {screen!r})",
        )
        need(not screen or e.every >= 1, "eval.screen_per_prompt screens stages between held-out evaluations: set eval.every >= 1")
        need(
            isinstance(es.screen_band_se, (int, float)) and not isinstance(es.screen_band_se, bool) and es.screen_band_se >= 0,
            f"early_stop.screen_band_se must be a number >= 0, e.g. 2 (got {es.screen_band_se!r})",
        )
        need(
            isinstance(es.metric, str) and es.metric.startswith("eval_"),
            f"early_stop.metric must be a held-out metric such as eval_reward_mean (got {es.metric!r})",
        )
        for key, _, _, ratio in self.floor_settings():
            need(ratio is None or 0 < ratio <= 1, f"early_stop.{key} must be in (0, 1] or null (got {ratio})")
        need(e.every >= 1 or not self.stopper_settings_active(), "early_stop needs held-out evaluation: set eval.every >= 1 or turn early_stop off")
        need(
            isinstance(self.reward, dict) and ("name" in self.reward or "mix" in self.reward),
            f"reward must be a mapping with 'name' (e.g. reward.name={self.example_reward}) or 'mix'",
        )
        self.check()
        return self

    def check(self) -> None:
        """The kind's own rules (raise through :func:`need`)."""

    # -- checks that read files, before any model is loaded -------------------------------------------
    def load_prompt_sets(self) -> tuple[list[str] | None, list[str]]:
        """The training prompts (None when an external pool brings its own) and the held-out prompts."""
        raise NotImplementedError

    def preflight(self) -> tuple[list[str] | None, list[str]]:
        """Read the prompt files and check the sizes they imply; the CLI calls this right after loading, so a bad
        prompt file or an absurd size fails in a second instead of after the model has loaded."""
        train, held_out = self.load_prompt_sets()
        k, limit = self.sampling.num_per_prompt, self.max_stage_samples
        if train is not None:
            per = min(self.prompts.per_stage or len(train), len(train))
            need(
                per * k <= limit,
                f"one stage would generate {per * k:,} {self.sample_noun} ({per} prompts x sampling.num_per_prompt={k}), "
                f"more than the {limit:,} a stage's pool is sized for; lower sampling.num_per_prompt or prompts.per_stage "
                f"(RAFT needs K of about 4-64 per prompt)",
            )
        n_eval = len(held_out) * self.eval.num_per_prompt
        need(
            not self.eval.every or n_eval <= limit,
            f"each evaluation would generate {n_eval:,} {self.sample_noun} ({len(held_out)} held-out prompts x "
            f"eval.num_per_prompt={self.eval.num_per_prompt}), more than {limit:,}; lower eval.num_per_prompt",
        )
        return train, held_out

    # -- early stop ----------------------------------------------------------------------------
    def floor_settings(self) -> list[tuple[str, str, str, float | None]]:
        """The kind's early-stop floors: (early_stop key, metrics.jsonl key, label, ratio or None)."""
        return []

    def stopper_settings_active(self) -> bool:
        es = self.early_stop
        return es.patience is not None or es.target_rise_sd is not None or any(r is not None for *_, r in self.floor_settings())

    def stopper(self) -> EarlyStopper | None:
        """The early-stop rule for ``run_raft(should_stop=...)``, or None when early_stop is off."""
        es = self.early_stop
        floors = [(metric, label, ratio) for _, metric, label, ratio in self.floor_settings() if ratio is not None]
        stopper = EarlyStopper(
            patience=es.patience,
            metric=es.metric,
            min_delta=es.min_delta,
            floors=floors,
            target_rise_sd=es.target_rise_sd,
            screen_band_se=es.screen_band_se,
            floor_patience=es.floor_patience,
        )
        return stopper if stopper.active else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fill_sections(config) -> None:
    """Give every nested-section field left as None its section's defaults (for root config dataclasses)."""
    for f in dataclasses.fields(config):
        sub = _section_type(type(config), f.name)
        if sub is not None and getattr(config, f.name) is None:
            setattr(config, f.name, sub())


def _section_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    return tp if dataclasses.is_dataclass(tp) else None


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key the config class accepts."""
    out = []
    for f in dataclasses.fields(cls):
        sub = _section_type(cls, f.name)
        out.append(prefix + f.name)
        if sub is not None:
            out.extend(valid_keys(sub, prefix + f.name + "."))
    return out


# the config class of each kind, with its name and the commands that run and report it (each kind's package
# registers itself), so that a config or run of one kind given to the other's command is named as such
_KINDS: dict[type, tuple[str, str, str]] = {}


def register_kind(cls, label: str, align: str, report: str) -> None:
    """Register config class ``cls``: ``label`` (e.g. "an LLM"), the command that runs its configs and the one that
    reports a run of it (``{run}`` stands for the run directory)."""
    _KINDS[cls] = (label, align, report)


def kind_of(keys) -> tuple[type, tuple[str, str, str]] | None:
    """The registered kind that takes the most of the dotted ``keys`` (ties: None), with its registration."""
    keys = set(keys)
    scores = sorted(((len(keys & set(valid_keys(cls))), cls) for cls in _KINDS), key=lambda x: -x[0])
    if not scores or scores[0][0] == 0 or (len(scores) > 1 and scores[1][0] == scores[0][0]):
        return None
    return scores[0][1], _KINDS[scores[0][1]]


def _unknown(key: str, root) -> ConfigError:
    keys = valid_keys(root)
    for other, (label, align, _) in _KINDS.items():
        if other is not root and key in valid_keys(other):
            return ConfigError(f"unknown config key '{key}' here: it belongs to {label} config, which runs with `{align}`")
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not near:  # try matching the last component only
        leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
        near = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)]
    hint = f"; did you mean '{near[0]}'?" if near else "; run 'raft-diffusion config-help' to list valid keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, data: dict, prefix: str = "", root=None):
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(prefix + str(key), root)
        sub = _section_type(cls, key)
        if sub is not None:
            kwargs[key] = _build(sub, value or {}, prefix + key + ".", root)
        else:
            kwargs[key] = _coerce(value, typing.get_type_hints(cls)[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"bad config section '{prefix}': {e}") from None


def _coerce(value: Any, tp, key: str) -> Any:
    """Turn a YAML value into the field's scalar type (e.g. '1e-4' -> 1e-4); error on nonsense."""
    args = typing.get_args(tp)
    if value is None:
        if tp is Any or type(None) in args:
            return None
        raise ConfigError(f"{key} must not be null")
    scalar = next((a for a in args if a is not type(None)), tp) if args and type(None) in args else tp
    if scalar is list and isinstance(value, str):
        return [value]  # a single name where a list of names is expected (e.g. train.target_modules=to_q)
    if scalar not in (int, float, bool, str):
        return value
    if scalar is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if scalar is str:
        return value if isinstance(value, str) else str(value)
    if isinstance(value, bool):  # int(True) is 1: `num_stages=true` would otherwise run one stage without a word
        raise ConfigError(f"{key} must be {'an integer' if scalar is int else 'a number'}, got {str(value).lower()}")
    try:
        out = scalar(value)
    except (TypeError, ValueError, OverflowError):  # int(.inf) overflows
        raise ConfigError(f"{key} must be {'an integer' if scalar is int else 'a number'}, got {value!r}") from None
    if scalar is float and not math.isfinite(out):  # .nan and .inf pass every range check below or fail late in the run
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if scalar is int and isinstance(value, float) and value != out:
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return out


def _set_dotted(data: dict, dotted: str, value: Any, root) -> None:
    parts = dotted.split(".")
    node = data
    cls = root
    for i, part in enumerate(parts[:-1]):
        sub = _section_type(cls, part) if cls is not None and part in {f.name for f in dataclasses.fields(cls)} else None
        if cls is not None and sub is None and part not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown(".".join(parts[: i + 1]), root)
        if part not in node and cls is not None and sub is None:  # free-form mapping: start from its default
            default = next(f for f in dataclasses.fields(cls) if f.name == part)
            node[part] = default.default_factory() if default.default_factory is not dataclasses.MISSING else {}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{'.'.join(parts[: i + 1])}' is not a mapping")
        cls = sub  # None below a free-form dict (e.g. reward.kwargs.x)
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b=c`` strings to (key, YAML-parsed value) pairs."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. sampling.num_per_prompt=16)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


_PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds raft_diffusion/


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """``value`` (a config mapping, list or scalar) with ``fn`` applied to every string in it."""
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return fn(value) if isinstance(value, str) else value


def _packaged_path(value: str) -> str:
    """A relative path into the package (``raft_diffusion/...``, as the toy presets name their assets) that the current
    folder does not have, made absolute when the installed package has it: a preset then runs from any folder, and
    from the repository's root it reads (and its run's config.yaml keeps) the path as given."""
    if value.startswith("raft_diffusion/") and not Path(value).exists() and (_PACKAGE_PARENT / value).exists():
        return str(_PACKAGE_PARENT / value)
    return value


def packaged_relative(value: Any) -> Any:
    """``value`` with every absolute path into the installed package written back as ``raft_diffusion/...``: the
    form in which a run's config is compared on resume, whichever folder the run was started or resumed from."""
    prefix = f"{_PACKAGE_PARENT}/raft_diffusion/"
    return _map_strings(value, lambda s: "raft_diffusion/" + s[len(prefix) :] if s.startswith(prefix) else s)


def config_from_dict(data: dict | None, overrides: list[str] = (), *, cls):
    """Build and validate a config of class ``cls`` (a :class:`BaseConfig` subclass) from a mapping + overrides."""
    data = dict(data or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value, cls)
    return _build(cls, _map_strings(data, _packaged_path)).validate()


def load_config(path: str | Path | None, overrides: list[str] = (), *, cls):
    """YAML preset (optional) + ``key=value`` overrides -> validated config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config {p} is a folder, not a YAML file: give a preset such as configs/tiny.yaml")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (give a YAML preset, e.g. configs/tiny.yaml)")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must be a mapping of sections (seed:, model:, sampling:, ...), not a {type(data).__name__}")
    return config_from_dict(data, overrides, cls=cls)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where: ``<problem> at line L, column C``."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def dump_config(cfg: BaseConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_help(cls, prefix: str = "") -> list[str]:
    """``key (default): help`` lines for every field of a config class."""
    lines = []
    for f in dataclasses.fields(cls):
        sub = _section_type(cls, f.name)
        if sub is not None:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.extend(config_help(sub, prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} ({default!r}): {f.metadata.get('help', '')}")
    return lines


def add_align_arguments(parser, example: str) -> None:
    """The ``align`` command's arguments, shared by the diffusion and LLM CLIs (``example``: a preset path)."""
    from pathlib import Path

    parser.add_argument("--config", "-c", type=Path, help=f"YAML preset, e.g. {example}")
    parser.add_argument("--output-dir", "-o", type=Path, required=True, help="run directory (resumed if it exists)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. sampling.num_per_prompt=16")


def config_reference(cls, title: str, intro: str = "") -> str:
    """A Markdown table of every key of a config class (key, default, meaning), one section per block."""
    out = [f"## {title}", ""]
    if intro:
        out += [intro, ""]
    out += ["| key | default | meaning |", "|---|---|---|"]

    def rows(c, prefix: str) -> None:
        for f in dataclasses.fields(c):
            sub = _section_type(c, f.name)
            text = f.metadata.get("help", "").replace("|", "\\|")
            if sub is not None:
                out.append(f"| **`{prefix}{f.name}`** | | {text} |")
                rows(sub, prefix + f.name + ".")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
                out.append(f"| `{prefix}{f.name}` | `{shown}` | {text} |")

    rows(cls, "")
    return "\n".join(out) + "\n"
