"""The one configuration schema of the serving application: the model, its engine, tensor
parallelism, replica groups (fixed count or autoscaling), the ingress's admission bound and the
ports. `shardline serve` flags, the Python API (`build_app`) and the `args` of an application in a
Serve YAML (deploy/serve.yaml) all become a ClusterConfig through `ClusterConfig.from_dict`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardline.worker.config import ConfigError, EngineConfig, speculative_fields_from_json
from shardline.worker.tokenizer import read_chat_template

# EngineConfig fields the cluster sets itself (model and tp live at the top level of the config).
_ENGINE_TOP_LEVEL = ("model", "tensor_parallel_size")

# The environment variable read when no api_keys are configured (several keys: comma-separated).
API_KEY_ENV = "SHARDLINE_API_KEY"

# generation_config values that are not a directory: the model's own file, or the server's defaults.
GENERATION_CONFIG_CHOICES = ("auto", "vllm")

# The `router` choices and the import path of the Serve RequestRouter class each one names.
ROUTERS = {
    "kv_aware": "shardline.router.request_router.KVAwareRouter",
    # NOTE: the public alias ray.serve.llm.request_router imports ray.serve.llm, which needs pyarrow
    # (not installed); the class itself does not.
    "prefix_affinity": "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter",
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}


# One Ingress replica per this many cores by default. Per streamed item the Ingress costs about
# as much CPU as the proxy and the ReplicaGroup's streaming together (docs/performance.md), and a
# node's cores also run the proxy, the engines' host work and Ray itself.
CORES_PER_INGRESS = 4


# Environment of the Ingress and ReplicaGroup replica processes (their ray_actor_options'
# runtime_env, so it holds however the application is started: shardline serve, serve run, KubeRay),
# as Ray Serve's own RAY_SERVE_THROUGHPUT_OPTIMIZED mode sets them (docs/performance.md has the A/Bs):
# - user code on the replica's main event loop: by default Serve runs it on a second loop in its
#   own thread, so every streamed item crosses from one loop (and thread) to the other;
# - request routing on the caller's loop (the Ingress's handle to the ReplicaGroup): by default
#   each routing decision hops to a router loop in another thread and back.
ROUTER_LOOP_ENV = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", ROUTER_LOOP_ENV: "0"}

# How requests and their stream items cross Serve's two hops (proxy -> Ingress, Ingress ->
# ReplicaGroup), the `serve_transport` choices:
# - "grpc": Serve 2.60's gRPC transport between deployments (each replica runs an internal gRPC
#   server; part of Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED mode): one gRPC message per stream item,
#   the item pickled (plain pickle: our items are importable dataclasses). The proxies take it from
#   RAY_SERVE_PROXY_USE_GRPC in their environment (cluster/proxies.py), the Ingress's handle from
#   its options (router/ingress.py).
# - "actor": Serve's default, a Ray streaming-generator object per item (an ObjectRef reported
#   through Ray's core worker, serialized by Ray, fetched by the caller): about twice the CPU per
#   item on each hop (docs/performance.md).
SERVE_TRANSPORTS = ("grpc", "actor")
PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"


def replica_actor_options(env: dict[str, str], **options: Any) -> dict[str, Any]:
    """ray_actor_options for a replica of ours: `options` plus `env` as its runtime_env."""
    return {**options, "runtime_env": {"env_vars": dict(env)}}


@dataclass(frozen=True)
class ClusterConfig:
    """Everything `build_app` needs. Validated once, here; unknown keys are errors naming the key."""

    model: str = "smollm2-135m"
    tensor_parallel_size: int = 1
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields except model / tp
    replicas: int = 1  # fixed number of replica groups (ignored when autoscaling is set)
    autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config for the ReplicaGroup
    # Serve deployment options for the ReplicaGroup beyond the ones above (max_ongoing_requests,
    # max_queued_requests, graceful_shutdown_timeout_s, health_check_period_s, ...).
    replica_group_options: dict[str, Any] = field(default_factory=dict)
    use_gpu: bool | None = None  # None: GPUs when the engine's device resolves to cuda
    cpus_per_rank: float = 1.0  # CPU share of each rank's placement-group bundle
    max_in_flight: int = 1024  # requests the ingress holds at once; beyond: RESOURCE_EXHAUSTED / 429
    # Ingress replicas (each tokenizes, validates and relays every stream item of its requests);
    # None: one per CORES_PER_INGRESS cores of the machine building the app, 1..8.
    ingress_replicas: int | None = None
    request_timeout_s: float | None = None  # server-side cap on a request's life (None: no cap)
    stall_timeout_s: float = 60.0  # check_health fails after this long without progress while busy
    routing_stats_period_s: float = 1.0  # how often replicas report load and cached blocks
    summary_blocks: int = 4096  # most recently used block hashes a replica reports (8 bytes each)
    routing: dict[str, Any] = field(default_factory=dict)  # the router's knobs (request_router_kwargs)
    # Which Serve request router the ReplicaGroup uses: "kv_aware" (ours, router/request_router.py),
    # "prefix_affinity" (Ray's PrefixCacheAffinityRouter) or "pow2" (Ray's default power of two
    # choices). The other two exist to compare against (benchmarks/routing.py, docs/routing.md).
    router: str = "kv_aware"
    metrics_period_s: float = 1.0  # how often replicas push their metrics snapshot
    # The names clients may put in a request's `model` (vLLM's --served-model-name, one or more).
    # The first is the one reported: /v1/models' first entry, GetModelInfo, responses' `model`,
    # metrics labels. Empty in the input means [model]; after validation it is never empty.
    served_model_names: list[str] = field(default_factory=list)
    # Keys a client must send (HTTP `Authorization: Bearer KEY`, gRPC `authorization` metadata).
    # Empty: no authentication. Empty in the input takes $SHARDLINE_API_KEY (several keys separated
    # by commas). Secrets: kept out of repr and of every logged dump of the config.
    api_keys: list[str] = field(default_factory=list, repr=False)
    # Where requests' default sampling parameters come from (vLLM's --generation-config): "auto" reads
    # the model's generation_config.json (temperature, top_p, top_k, repetition_penalty...), "vllm"
    # uses the server's own defaults, anything else is a directory holding a generation_config.json.
    generation_config: str = "auto"
    # A chat template replacing the model's own (vLLM's --chat-template): a file path or the Jinja
    # text itself. A path is read once, here, so that after validation this holds the template's
    # text and replicas on other nodes need no copy of the file. None: the model's template.
    chat_template: str | None = None
    # vLLM's --enable-auto-tool-choice: chat requests may use tool_choice "auto" (the default when
    # `tools` are given), the model's calls read by tool_call_parser. Off: such a request is a 400
    # naming the flag, as in vLLM.
    enable_auto_tool_choice: bool = False
    # vLLM's --tool-call-parser: "hermes" or "llama3_json" (router/tool_parsers.py). None: the one
    # the chat template implies (llama3_json for Llama 3.x templates, hermes otherwise).
    tool_call_parser: str | None = None
    grpc_port: int = 9000
    http_port: int = 8000
    host: str = "127.0.0.1"
    app_name: str = "shardline"
    log_json: bool = False  # one JSON object per log line (request id, replica group, finish reason, tokens)
    log_level: str = "INFO"
    log_prompts: bool = False  # prompts and completions are user data: never logged unless asked
    # ---- limits and security (docs/security.md) ----
    max_request_body_bytes: int = 8 * 2**20  # HTTP bodies beyond this: 413 before the body is read
    max_request_header_bytes: int = 64 * 2**10  # all HTTP header names and values: beyond, 431 (uvicorn under Ray sets no bound)
    max_grpc_message_bytes: int = 8 * 2**20  # gRPC proxy's receive/send limit (Serve's default: 2 GiB)
    # Characters of a text prompt or of all chat contents, checked before tokenizing; None: 32 per
    # token of max_model_len (no tokenizer here has longer tokens in ordinary text).
    max_prompt_chars: int | None = None
    tokenizer_threads: int = 4  # tokenization and chat templating run on this many threads, off the event loop
    # Nesting of an HTTP JSON body (objects and arrays inside each other): deeper is a 400 naming
    # this limit. OpenAI bodies nest ~6 deep; tool and response-format JSON schemas add their own.
    max_json_depth: int = 64
    max_request_id_chars: int = 128  # a client-chosen request id is a label of at most this many printable characters
    ssl_certfile: str | None = None  # HTTPS for the HTTP proxy (with ssl_keyfile); gRPC TLS: grpc_ssl_certfile
    ssl_keyfile: str | None = None
    # TLS for the gRPC proxy (PEM certificate chain and private key; Ray 2.60 has no option for it:
    # router/grpc_proxy.py adds it). Read by the proxy on its node.
    grpc_ssl_certfile: str | None = None
    grpc_ssl_keyfile: str | None = None
    # Prefix-cache isolation per tenant: the cache salt comes from the caller's identity (API key),
    # never from the request, and cached_tokens reports only the caller's own hits.
    tenant_isolation: bool = False
    # How stream items cross Serve's hops: "grpc" (Serve's gRPC transport) or "actor" (Ray
    # streaming generators, Serve's default); see SERVE_TRANSPORTS above.
    serve_transport: str = "grpc"
    # Serve's direct ingress (cluster/direct_ingress.py): each Ingress replica also serves gRPC and
    # HTTP on its own ports (Serve's, from 40000 / 30000), one process hop less than the proxy.
    # Serve binds that gRPC port on every interface (`host` does not apply to it) and without TLS.
    direct_ingress: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.replicas < 1:
            raise ConfigError(f"replicas: must be >= 1, got {self.replicas}")
        if self.ingress_replicas is not None and self.ingress_replicas < 1:
            raise ConfigError(f"ingress_replicas: must be >= 1, got {self.ingress_replicas}")
        if self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight: must be >= 1, got {self.max_in_flight}")
        if self.cpus_per_rank <= 0:
            raise ConfigError(f"cpus_per_rank: must be > 0 (a placement-group bundle cannot be empty), got {self.cpus_per_rank}")
        for name in ("grpc_port", "http_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ConfigError(f"{name}: must be a TCP port, got {getattr(self, name)}")
        for name in ("max_request_body_bytes", "max_request_header_bytes", "max_grpc_message_bytes", "tokenizer_threads", "max_request_id_chars",
                     "max_json_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ConfigError(f"max_prompt_chars: must be >= 1, got {self.max_prompt_chars}")
        for prefix in ("ssl", "grpc_ssl"):
            certfile, keyfile = getattr(self, f"{prefix}_certfile"), getattr(self, f"{prefix}_keyfile")
            if (certfile is None) != (keyfile is None):
                raise ConfigError(f"{prefix}_certfile: TLS needs both {prefix}_certfile and {prefix}_keyfile")
            for name, path in ((f"{prefix}_certfile", certfile), (f"{prefix}_keyfile", keyfile)):
                if path is not None and not Path(path).is_file():
                    raise ConfigError(f"{name}: no such file: {path!r}")
        if self.serve_transport not in SERVE_TRANSPORTS:
            raise ConfigError(f"serve_transport: must be one of {', '.join(SERVE_TRANSPORTS)}, got {self.serve_transport!r}")
        if self.direct_ingress and (self.ssl_certfile or self.grpc_ssl_certfile):
            raise ConfigError("direct_ingress: the Ingress replicas' own servers have no TLS option in Ray Serve "
                              "2.60; unset ssl_certfile / grpc_ssl_certfile or direct_ingress")
        if self.router not in ROUTERS:
            raise ConfigError(f"router: must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        for key in _ENGINE_TOP_LEVEL:
            if key in self.engine:
                raise ConfigError(f"engine.{key}: set `{key}` at the top level of the config, not under engine")
        self.engine_config()  # validates the engine fields now, not in a replica minutes later
        self._validate_front_door()

    def _validate_front_door(self) -> None:
        """Names, keys, generation defaults and chat template: checked and normalized once, here
        (fields are filled through object.__setattr__ because the dataclass is frozen)."""
        given = self.served_model_names
        names = [given] if isinstance(given, str) else list(given or [self.model])
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"served_model_names: each name must be a non-empty string, got {name!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"served_model_names: names must be distinct, got {names!r}")
        object.__setattr__(self, "served_model_names", names)
        keys = list(self.api_keys) or [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
        for i, key in enumerate(keys):
            # NOTE: the message names the key's position, never its value (keys are secrets).
            if not isinstance(key, str) or not key or key != key.strip() or any(c.isspace() for c in key):
                raise ConfigError(f"api_keys[{i}]: a key must be a non-empty string without whitespace")
        object.__setattr__(self, "api_keys", keys)
        if self.generation_config not in GENERATION_CONFIG_CHOICES and not Path(self.generation_config).is_dir():
            raise ConfigError(f"generation_config: must be auto, vllm or an existing directory, got {self.generation_config!r}")
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", read_chat_template(self.chat_template))
        from shardline.router.tool_parsers import TOOL_CALL_PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(f"tool_call_parser: must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                              f"got {self.tool_call_parser!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ClusterConfig":
        """Build from a plain dict (Serve application args, a config file, the CLI)."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown config key; known keys: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "ClusterConfig":
        """Read a YAML/JSON file (see read_file); `overrides` that are not None replace its keys."""
        data = cls.read_file(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @staticmethod
    def read_file(path: str | Path) -> dict[str, Any]:
        """The ClusterConfig mapping of a YAML/JSON file, not yet validated (so that command-line
        flags can be laid over it first): either a plain ClusterConfig mapping or a Serve config
        (deploy/serve.yaml), whose first application's args, ReplicaGroup options and ports are used."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        if "applications" in data:
            data = _from_serve_config(data)
        return data

    @property
    def router_needs_text(self) -> bool:
        """Whether the router reads the prompt as text (a RoutingHint must go with each generate call)."""
        return self.router == "prefix_affinity"

    def engine_config(self) -> EngineConfig:
        """The EngineConfig every replica group builds its engine from."""
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        fields = dict(self.engine)
        # vLLM's speculative_config object (or its JSON text) stands for the flat speculative_* fields.
        fields.update(speculative_fields_from_json(fields.pop("speculative_config", None)))
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"engine.{unknown[0]}: unknown engine field; known: {', '.join(sorted(known - set(_ENGINE_TOP_LEVEL)))}")
        return EngineConfig(model=self.model, tensor_parallel_size=self.tensor_parallel_size, **fields)

    @property
    def snapshot_ttl_s(self) -> float:
        """How long a replica's last metrics/stats snapshot counts as live (a dead one's expires)."""
        return max(5 * self.metrics_period_s, 3.0)

    @property
    def graceful_shutdown_timeout_s(self) -> float:
        """How long a drain waits for requests in flight: the ReplicaGroup's Serve option of that
        name (Serve's default, 20 s, when unset)."""
        return float(self.replica_group_options.get("graceful_shutdown_timeout_s", 20.0))

    def prompt_chars_limit(self, max_model_len: int) -> int:
        """The cheap pre-tokenization bound on a prompt's characters (see max_prompt_chars)."""
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * max_model_len

    @property
    def model_name(self) -> str:
        """The name clients see (/v1/models, GetModelInfo) and metrics carry."""
        return self.served_model_names[0]

    @property
    def model_names(self) -> list[str]:
        """Every name a request's `model` may carry (a request naming another gets model_not_found)."""
        return list(self.served_model_names)

    def wants_gpu(self) -> bool:
        """Whether rank bundles ask for GPUs."""
        if self.use_gpu is not None:
            return self.use_gpu
        return self.engine_config().resolved_device().type == "cuda"

    def replica_env(self) -> dict[str, str]:
        """REPLICA_ENV for this application's replicas. Ray's PrefixCacheAffinityRouter makes
        blocking ray.get calls while it routes, so with it routing keeps its own loop."""
        from shardline.cluster.direct_ingress import direct_ingress_environment

        env = dict(REPLICA_ENV)
        if self.router == "prefix_affinity":
            env[ROUTER_LOOP_ENV] = "1"
        return env | direct_ingress_environment(self)

    def stream_handle_options(self) -> dict[str, Any]:
        """`DeploymentHandle.options` of the Ingress's generate calls to the ReplicaGroup for
        serve_transport: over gRPC, arguments and items are plain-pickled (GenerationRequest,
        StreamItem and RequestError are importable classes; cloudpickle's by-value machinery
        is not needed)."""
        if self.serve_transport == "actor":
            return {"stream": True}
        return {"stream": True, "_by_reference": False, "request_serialization": "pickle",
                "response_serialization": "pickle"}

    def resolved_ingress_replicas(self) -> int:
        """How many Ingress replicas: the config's, else one per CORES_PER_INGRESS cores (1..8)."""
        if self.ingress_replicas is not None:
            return self.ingress_replicas
        return max(1, min(8, (os.cpu_count() or 1) // CORES_PER_INGRESS))

    def placement_bundles(self) -> list[dict[str, float]]:
        """One bundle per tensor-parallel rank; the replica actor itself takes bundle 0."""
        bundle: dict[str, float] = {"CPU": self.cpus_per_rank}
        if self.wants_gpu():
            bundle["GPU"] = 1
        return [dict(bundle) for _ in range(self.tensor_parallel_size)]

    def replica_group_deployment_options(self) -> dict[str, Any]:
        """Options for `ReplicaGroup.options(...)`: placement group, replicas or autoscaling, and
        the extra Serve options from the config."""
        bundles = self.placement_bundles()
        options: dict[str, Any] = {
            "placement_group_bundles": bundles,
            "placement_group_strategy": "STRICT_PACK",
            # the replica actor (rank 0) must fit in bundle 0
            "ray_actor_options": replica_actor_options(self.replica_env(), num_cpus=bundles[0]["CPU"],
                                                       num_gpus=bundles[0].get("GPU", 0)),
        }
        if self.autoscaling:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.replicas
        options.update(self.batching_defaults())
        options.update(self.replica_group_options)
        return options

    def batching_defaults(self) -> dict[str, int]:
        """Serve's admission bounds for the ReplicaGroup when the config sets none (Serve's own
        default of 5 ongoing requests per replica would cap every engine's batch at 5):
        `max_ongoing_requests` = max_num_seqs + half of it (a full batch plus a short line the
        engine refills from at once, as deploy/serve.yaml sets by hand), and `max_queued_requests`
        = 4 x max_num_seqs per caller: past both, Serve refuses at once and the ingress answers
        RESOURCE_EXHAUSTED / 429."""
        seqs = self.engine_config().max_num_seqs
        return {"max_ongoing_requests": seqs + max(1, seqs // 2), "max_queued_requests": 4 * seqs}


def _from_serve_config(serve: dict[str, Any]) -> dict[str, Any]:
    """A ClusterConfig dict from a Serve config: the first application's args, its ReplicaGroup
    deployment options, and the proxies' ports."""
    apps = serve.get("applications") or []
    if not apps:
        raise ConfigError("applications: the Serve config has no application")
    app = apps[0]
    data = dict(app.get("args") or {})
    data.setdefault("app_name", app.get("name", "shardline"))
    for deployment in app.get("deployments") or []:
        if deployment.get("name") != "ReplicaGroup":
            continue
        options = {k: v for k, v in deployment.items() if k != "name"}
        autoscaling = options.pop("autoscaling_config", None)
        if "num_replicas" in options and isinstance(options["num_replicas"], int):
            data.setdefault("replicas", options.pop("num_replicas"))
        if autoscaling:
            data.setdefault("autoscaling", autoscaling)
        data.setdefault("replica_group_options", options)
    http = serve.get("http_options") or {}
    grpc = serve.get("grpc_options") or {}
    if "port" in http:
        data.setdefault("http_port", http["port"])
    if "host" in http:
        data.setdefault("host", http["host"])
    if "port" in grpc:
        data.setdefault("grpc_port", grpc["port"])
    return data

