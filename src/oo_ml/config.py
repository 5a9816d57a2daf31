"""Configuration: one frozen dataclass tree, loaded from `OO_*` variables and `oo-ml serve` flags.

Each leaf field declares its environment variable, its flag (if any) and its help text in
the field's metadata, so `--help`, the README table (`oo-ml config`) and the loader all read
the same declaration. A flag beats the environment, which beats the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def setting(default: T, env: str, help: str, flag: str | None = None) -> T:
    """Declare a config leaf: its default, env variable, optional flag and help."""
    value: T = field(default=default, metadata={"env": env, "flag": flag, "help": help})
    return value


def _parse_bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _parse_optional_float(raw: str) -> float | None:
    v = raw.strip().lower()
    if v in {"", "off", "none"}:
        return None
    return float(v)


def _parse_csv(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": _parse_bool,
    "Path": Path,
    "float | None": _parse_optional_float,
    "tuple[str, ...]": _parse_csv,
    "str | None": lambda raw: raw or None,
    "Path | None": lambda raw: Path(raw) if raw.strip() else None,
    "int | None": lambda raw: int(raw) if raw.strip() else None,
}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "OO_HOST", "Address to listen on.", "--host")
    port: int = setting(50051, "OO_PORT", "Port to listen on (0 picks a free one).", "--port")
    data_dir: Path = setting(
        Path(".data"),
        "OO_DATA_DIR",
        "Folder for the SQLite state and the local NATS store.",
        "--data-dir",
    )
    max_message_bytes: int = setting(
        1 << 20, "OO_MAX_MESSAGE_BYTES", "Largest request or response message, in bytes."
    )
    grace_s: float = setting(
        10.0,
        "OO_SHUTDOWN_GRACE_S",
        "On SIGTERM, how long in-flight calls may run before they are cut.",
    )
    auth_token: str | None = setting(
        None, "OO_AUTH_TOKEN", "Bearer token every RPC must carry (unset: no auth)."
    )
    admin_token: str | None = setting(
        None,
        "OO_ADMIN_TOKEN",
        "Bearer token for admin RPCs (Reset); unset: Reset is refused when auth is on.",
    )
    metrics_port: int | None = setting(
        None,
        "OO_METRICS_PORT",
        "Port of the plain-HTTP /metrics endpoint (Prometheus text); unset: off.",
    )
    tls_cert_file: Path | None = setting(
        None,
        "OO_TLS_CERT_FILE",
        "PEM certificate chain of the gRPC port; with OO_TLS_KEY_FILE turns TLS on."
        " Re-read when it changes, no restart needed.",
    )
    tls_key_file: Path | None = setting(
        None, "OO_TLS_KEY_FILE", "PEM private key of OO_TLS_CERT_FILE (both or neither)."
    )
    tls_client_ca_file: Path | None = setting(
        None,
        "OO_TLS_CLIENT_CA_FILE",
        "PEM CA bundle; set, every client must present a certificate it signed (mTLS)."
        " Needs TLS on.",
    )
    insecure: bool = setting(
        False,
        "OO_INSECURE",
        "Allow a non-loopback OO_HOST without TLS or without OO_AUTH_TOKEN (refused otherwise).",
        "--insecure",
    )
    reflection: str = setting(
        "auth",
        "OO_REFLECTION",
        "Server reflection: auth (needs OO_AUTH_TOKEN's token when set) or public.",
    )
    workers: int = setting(
        1,
        "OO_WORKERS",
        "Server processes sharing the port (SO_REUSEPORT) and the store; 1: this process.",
        "--workers",
    )
    state: str = setting(
        "sqlite",
        "OO_STATE",
        "Where models, decisions and profiles live: sqlite (a file in the data dir) or nats"
        " (JetStream KV and streams on OO_NATS_URL, shared by replicas).",
        "--state",
    )
    nats_replicas: int = setting(
        1,
        "OO_NATS_REPLICAS",
        "Replicas of each JetStream bucket and stream that OO_STATE=nats creates (3 on a"
        " three-node cluster).",
    )
    join_wait_ms: float = setting(
        1000.0,
        "OO_DECISION_JOIN_WAIT_MS",
        "With several workers or replicas, how long a Reward waits for a decision made"
        " elsewhere in the last moments and not yet flushed; still missing, a decision under"
        " 30 s old is UNAVAILABLE (retry), an older one NOT_FOUND.",
    )

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None


@dataclass(frozen=True, slots=True)
class ScoringConfig:
    default_policy: str = setting(
        "egreedy", "OO_POLICY", "Policy used when a request names none.", "--policy"
    )
    shadow_policies: tuple[str, ...] = setting(
        (),
        "OO_SHADOW_POLICIES",
        "Comma-separated policies scored off the hot path beside the served one.",
    )
    epsilon: float = setting(0.1, "OO_EPSILON", "Exploration rate of the egreedy policies.")
    linucb_alpha: float = setting(1.0, "OO_LINUCB_ALPHA", "Width of LinUCB's confidence bonus.")
    thompson_scale: float = setting(
        0.5, "OO_THOMPSON_SCALE", "Posterior scale of linear Thompson sampling."
    )
    min_exploration: float = setting(
        0.05,
        "OO_MIN_EXPLORATION",
        "Uniform exploration every policy mixes in (and logs in its propensities), so"
        " off-policy estimates have support for every candidate.",
    )
    ridge_lambda: float = setting(
        1.0, "OO_RIDGE_LAMBDA", "Ridge prior strength (A starts as lambda*I)."
    )
    max_arms: int = setting(
        256,
        "OO_MAX_ARMS",
        "Most arms one user's state keeps per policy; the least-used arm outside the request is dropped for a new one.",
    )
    decision_retention_s: float = setting(
        30 * 86400.0,
        "OO_DECISION_RETENTION_S",
        "How long rewarded decisions stay in the log (aggregate and prompt-version Stats cover this span).",
    )
    max_candidates: int | None = setting(
        None,
        "OO_MAX_CANDIDATES",
        "Most candidates one Score may carry; unset: the max_items declared in scoring.proto.",
    )
    reward_window_s: float = setting(
        86400.0, "OO_REWARD_WINDOW_S", "How long after a decision a Reward is accepted."
    )
    default_reward: float | None = setting(
        0.0,
        "OO_DEFAULT_REWARD",
        "Reward given to decisions unrewarded past the window ('off' disables).",
    )
    sweep_interval_s: float = setting(
        30.0, "OO_SWEEP_INTERVAL_S", "How often the sweeper applies default rewards."
    )
    prior_refresh_s: float = setting(
        30.0,
        "OO_PRIOR_REFRESH_S",
        "How often the population prior is recomputed (a young prior also once the rewards"
        " since reach a tenth of those it pooled).",
    )
    decision_log_max_mb: float = setting(
        2048.0,
        "OO_DECISION_LOG_MAX_MB",
        "Most disk the decision log may take; past it the oldest rewarded decisions go first.",
    )
    decision_durability: str = setting(
        "async",
        "OO_DECISION_DURABILITY",
        "async: Score answers once its decision is in the log buffer, group-committed every"
        " OO_DECISION_FLUSH_MS (a crash loses at most that interval's decisions, never an"
        " acknowledged reward); sync: Score answers after its decision's fsync.",
    )
    decision_flush_ms: float = setting(
        5.0, "OO_DECISION_FLUSH_MS", "Longest a logged decision waits for its group commit."
    )
    decision_flush_records: int = setting(
        512, "OO_DECISION_FLUSH_RECORDS", "Buffered decisions that start a commit at once."
    )
    decision_writer: str = setting(
        "process",
        "OO_DECISION_WRITER",
        "Who commits the decision log's batches and rewards' writes to SQLite: process (a"
        " child process, so the commits take no GIL from the event loop) or thread (the"
        " store's writer thread).",
    )
    state_cache_mb: float = setting(
        256.0, "OO_STATE_CACHE_MB", "Memory for decoded user models; the least recent go first."
    )
    decision_cache_mb: float = setting(
        32.0,
        "OO_DECISION_CACHE_MB",
        "Memory for the decisions committed last, so that a Reward finds its decision"
        " without reading the file (SQLite store); the oldest go first, 0 keeps none.",
    )
    feature_cache_s: float = setting(
        30.0,
        "OO_FEATURE_CACHE_S",
        "How long a user's stored profile and task features are cached (ingest refreshes"
        " them at once in this process).",
    )
    shadow_queue: int = setting(
        10_000,
        "OO_SHADOW_QUEUE",
        "Decisions waiting for shadow scoring; beyond, dropped and counted.",
    )
    shadow_cpu_share: float = setting(
        0.1,
        "OO_SHADOW_CPU_SHARE",
        "Most of the event loop's time shadow scoring may take; past it, it waits and the queue fills.",
    )


@dataclass(frozen=True, slots=True)
class IngestConfig:
    enabled: bool = setting(
        True, "OO_INGEST", "Consume signals.> and feedback.> from NATS JetStream."
    )
    nats_url: str | None = setting(
        None,
        "OO_NATS_URL",
        "NATS server to use (a cluster's nodes separated by commas); unset: start a local"
        " nats-server under the data dir.",
    )
    snoozed_reward: float = setting(
        0.2, "OO_SNOOZED_REWARD", "Reward of a snoozed tip (completed = 1, dismissed = 0)."
    )
    dedupe_window_s: float = setting(
        7 * 86400.0,
        "OO_DEDUPE_WINDOW_S",
        "How long an applied event_id is remembered (at least 24 h).",
    )
    batch: int = setting(256, "OO_INGEST_BATCH", "Messages fetched per pull.")
    ack_wait_s: float = setting(
        30.0, "OO_INGEST_ACK_WAIT_S", "Redelivery wait of an unacked message."
    )
    max_deliver: int = setting(
        5, "OO_INGEST_MAX_DELIVER", "Deliveries before a message is dead-lettered."
    )
    nats_creds_file: Path | None = setting(
        None,
        "OO_NATS_CREDS_FILE",
        "NATS credentials file (user JWT and nkey seed) for OO_NATS_URL.",
    )
    nats_tls_ca_file: Path | None = setting(
        None,
        "OO_NATS_TLS_CA_FILE",
        "PEM CA bundle that verifies OO_NATS_URL's certificate (unset: the system's CAs).",
    )
    nats_tls_cert_file: Path | None = setting(
        None,
        "OO_NATS_TLS_CERT_FILE",
        "PEM client certificate for NATS mutual TLS (with OO_NATS_TLS_KEY_FILE).",
    )
    nats_tls_key_file: Path | None = setting(
        None, "OO_NATS_TLS_KEY_FILE", "PEM private key of OO_NATS_TLS_CERT_FILE."
    )

    @property
    def nats_tls(self) -> bool:
        return self.nats_tls_ca_file is not None or self.nats_tls_cert_file is not None


@dataclass(frozen=True, slots=True)
class LLMConfig:
    model: str | None = setting(
        None, "OO_LLM_MODEL", "LiteLLM model name; unset: fallback tips only."
    )
    api_base: str | None = setting(None, "OO_LLM_API_BASE", "Base URL of the model provider's API.")
    timeout_s: float = setting(
        3.0, "OO_LLM_TIMEOUT_S", "Deadline of one model call, retries included."
    )
    retries: int = setting(
        1, "OO_LLM_RETRIES", "Retries of a failed model call within the deadline."
    )
    concurrency: int = setting(8, "OO_LLM_CONCURRENCY", "Model calls in flight at once; more wait.")
    default_prompt_version: str = setting(
        "v1", "DEFAULT_PROMPT_VERSION", "Prompt version used when a request names none."
    )
    prompt_rotation: tuple[str, ...] = setting(
        (), "OO_PROMPT_ROTATION", "Comma-separated versions assigned by a stable hash of user_id."
    )
    max_chars: int = setting(280, "OO_LLM_MAX_CHARS", "Longest tip accepted from the model.")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def __post_init__(self) -> None:
        # Comparisons are written so that NaN fails them: `not (x > 0)` is true for NaN.
        problems = []
        s = self.scoring

        def reward_ok(r: float) -> bool:
            return math.isfinite(r) and -1.0 <= r <= 1.0

        if not 0 <= s.epsilon <= 1:
            problems.append(f"OO_EPSILON must be in [0, 1] (got {s.epsilon})")
        if not 0 <= s.min_exploration <= 1:
            problems.append(f"OO_MIN_EXPLORATION must be in [0, 1] (got {s.min_exploration})")
        for name, value in (
            ("OO_RIDGE_LAMBDA", s.ridge_lambda),
            ("OO_REWARD_WINDOW_S", s.reward_window_s),
            ("OO_SWEEP_INTERVAL_S", s.sweep_interval_s),
            ("OO_PRIOR_REFRESH_S", s.prior_refresh_s),
            ("OO_DECISION_RETENTION_S", s.decision_retention_s),
            ("OO_LLM_TIMEOUT_S", self.llm.timeout_s),
        ):
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0 (got {value})")
        for name, value in (
            ("OO_LINUCB_ALPHA", s.linucb_alpha),
            ("OO_THOMPSON_SCALE", s.thompson_scale),
            ("OO_SHUTDOWN_GRACE_S", self.server.grace_s),
        ):
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0 (got {value})")
        if s.decision_durability not in ("async", "sync"):
            problems.append("OO_DECISION_DURABILITY must be 'async' or 'sync'")
        if s.decision_writer not in ("process", "thread"):
            problems.append("OO_DECISION_WRITER must be 'process' or 'thread'")
        if not (math.isfinite(s.decision_flush_ms) and 0 < s.decision_flush_ms <= 1000):
            problems.append("OO_DECISION_FLUSH_MS must be in (0, 1000]")
        if s.decision_flush_records < 1 or s.shadow_queue < 1:
            problems.append("OO_DECISION_FLUSH_RECORDS and OO_SHADOW_QUEUE must be >= 1")
        if not (math.isfinite(s.decision_log_max_mb) and s.decision_log_max_mb > 0):
            problems.append("OO_DECISION_LOG_MAX_MB must be a finite number > 0")
        if not (math.isfinite(s.state_cache_mb) and s.state_cache_mb >= 0):
            problems.append("OO_STATE_CACHE_MB must be a finite number >= 0")
        if not (math.isfinite(s.decision_cache_mb) and s.decision_cache_mb >= 0):
            problems.append("OO_DECISION_CACHE_MB must be a finite number >= 0")
        if not (math.isfinite(s.feature_cache_s) and s.feature_cache_s >= 0):
            problems.append("OO_FEATURE_CACHE_S must be a finite number >= 0")
        if not (0 < s.shadow_cpu_share <= 1):
            problems.append("OO_SHADOW_CPU_SHARE must be in (0, 1]")
        if s.max_candidates is not None and s.max_candidates < 1:
            problems.append("OO_MAX_CANDIDATES must be >= 1")
        if s.max_arms < (s.max_candidates or 1):
            problems.append("OO_MAX_ARMS must be at least OO_MAX_CANDIDATES")
        if s.default_reward is not None and not reward_ok(s.default_reward):
            problems.append("OO_DEFAULT_REWARD must be in [-1, 1] or 'off'")
        if not reward_ok(self.ingest.snoozed_reward):
            problems.append("OO_SNOOZED_REWARD must be in [-1, 1]")
        if not (self.ingest.dedupe_window_s >= 86400):
            problems.append("OO_DEDUPE_WINDOW_S must be at least 86400 (24 h)")
        if self.ingest.batch < 100:
            problems.append("OO_INGEST_BATCH must be at least 100")
        if self.ingest.max_deliver < 2:
            problems.append("OO_INGEST_MAX_DELIVER must be >= 2")
        srv, ing = self.server, self.ingest
        if (srv.tls_cert_file is None) != (srv.tls_key_file is None):
            problems.append("OO_TLS_CERT_FILE and OO_TLS_KEY_FILE go together: set both or neither")
        if srv.tls_client_ca_file is not None and not srv.tls:
            problems.append(
                "OO_TLS_CLIENT_CA_FILE needs TLS: set OO_TLS_CERT_FILE and OO_TLS_KEY_FILE"
            )
        if (ing.nats_tls_cert_file is None) != (ing.nats_tls_key_file is None):
            problems.append(
                "OO_NATS_TLS_CERT_FILE and OO_NATS_TLS_KEY_FILE go together: set both or neither"
            )
        if ing.nats_url is None and (ing.nats_tls or ing.nats_creds_file is not None):
            problems.append(
                "OO_NATS_CREDS_FILE and OO_NATS_TLS_* need OO_NATS_URL"
                " (the local nats-server has no TLS or credentials)"
            )
        if self.llm.concurrency < 1 or self.llm.retries < 0:
            problems.append("OO_LLM_CONCURRENCY must be >= 1 and OO_LLM_RETRIES >= 0")
        if self.server.reflection not in ("auth", "public"):
            problems.append("OO_REFLECTION must be auth or public")
        if not 1 <= srv.workers <= 64:
            problems.append(f"OO_WORKERS must be in [1, 64] (got {srv.workers})")
        if srv.state not in ("sqlite", "nats"):
            problems.append(f"OO_STATE must be sqlite or nats (got {srv.state!r})")
        if srv.state == "nats" and ing.nats_url is None:
            problems.append("OO_STATE=nats needs OO_NATS_URL (the NATS that replicas share)")
        if not 1 <= srv.nats_replicas <= 5:
            problems.append(f"OO_NATS_REPLICAS must be in [1, 5] (got {srv.nats_replicas})")
        if not (math.isfinite(srv.join_wait_ms) and 0 <= srv.join_wait_ms <= 60_000):
            problems.append("OO_DECISION_JOIN_WAIT_MS must be in [0, 60000]")
        if problems:
            raise ValueError("; ".join(problems))


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _leaves() -> list[tuple[str, type[Any], dataclasses.Field[Any]]]:
    out: list[tuple[str, type[Any], dataclasses.Field[Any]]] = []
    for section in dataclasses.fields(Config):
        cls = {
            "server": ServerConfig,
            "scoring": ScoringConfig,
            "ingest": IngestConfig,
            "llm": LLMConfig,
        }[section.name]
        out.extend((section.name, cls, f) for f in dataclasses.fields(cls))
    return out


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per leaf that declares one; help shows the env variable and default."""
    for _section, _cls, f in _leaves():
        flag = f.metadata["flag"]
        if not flag:
            continue
        help_ = f"{f.metadata['help']} Env {f.metadata['env']}; default {_show(f.default)}."
        if str(f.type) == "bool":  # a switch: present means true
            parser.add_argument(flag, dest=f.name, action="store_const", const="true", help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_)


def load(env: Mapping[str, str] | None = None, flags: argparse.Namespace | None = None) -> Config:
    """Build the config from env (os.environ by default) and parsed flags."""
    env = os.environ if env is None else env
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    errors = []
    for section, _cls, f in _leaves():
        raw: str | None = None
        if flags is not None and getattr(flags, f.name, None) is not None:
            raw = str(getattr(flags, f.name))
        elif f.metadata["env"] in env:
            raw = env[f.metadata["env"]]
        if raw is None:
            continue
        parse = _PARSERS[str(f.type)]
        try:
            sections[section][f.name] = parse(raw)
        except ValueError as e:
            errors.append(f"{f.metadata['env']}: {e}")
    if errors:
        raise ValueError("; ".join(errors))
    return Config(
        server=ServerConfig(**sections["server"]),
        scoring=ScoringConfig(**sections["scoring"]),
        ingest=IngestConfig(**sections["ingest"]),
        llm=LLMConfig(**sections["llm"]),
    )


def to_env(config: Config) -> dict[str, str]:
    """Every setting of `config` as its environment variable, so that
    `load(env=to_env(c)) == c`: how `oo-ml serve --workers N` hands the settings it
    resolved (its flags included) to the worker processes it starts."""
    out: dict[str, str] = {}
    for section, _cls, f in _leaves():
        value = getattr(getattr(config, section), f.name)
        out[f.metadata["env"]] = _as_env(value, str(f.type))
    return out


def _as_env(value: Any, type_name: str) -> str:
    if value is None:
        return "off" if type_name == "float | None" else ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def describe() -> list[tuple[str, str, str, str]]:
    """(env, flag, default, help) for every setting, for `oo-ml config` and the README."""
    return [
        (f.metadata["env"], f.metadata["flag"] or "", _show(f.default), f.metadata["help"])
        for _s, _c, f in _leaves()
    ]


def _show(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, tuple):
        return ",".join(default) or "empty"
    return str(default)
