"""Typed models of the YAML policy file. Unknown keys are errors everywhere."""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from sidecar.policy.windows import parse_duration
from sidecar.store.redis_cluster_url import as_cluster_url, is_cluster_url, parse_cluster_url

DIMENSIONS = ("user", "group", "token", "kind", "model", "provider")
_METADATA_DIM = re.compile(r"^metadata\.[A-Za-z0-9_.\-]{1,64}$")
_HOSTPORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


Algorithm = Literal["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def _exactly_one(self, first: str, second: str) -> None:
        """For a validator: the model takes one of two fields, never both nor neither."""
        if (getattr(self, first) is None) == (getattr(self, second) is None):
            raise ValueError(f"exactly one of {first} or {second} is required")


def _money(value: Any) -> Decimal:
    # YAML gives floats for 0.1; going through str keeps the decimal the user wrote.
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, float | int):
        value = str(value)
    if not isinstance(value, str | Decimal):
        raise ValueError("must be a number")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"must be a number, not {value!r}") from None
    if not amount.is_finite():
        raise ValueError("must be a finite number")
    return amount


Money = Annotated[Decimal, Field(ge=0)]


def _duration(value: str) -> str:
    parse_duration(value)
    return value


# A duration such as "90s", "10m", "12h", "7d", checked when the file is loaded.
Duration = Annotated[str, AfterValidator(_duration)]


class StoreConfig(Strict):
    url: str = "sqlite:///./sidecar.db"
    # When set, the URL comes from this environment variable (a Redis password kept in a
    # Secret, not in the config file); `url` is then ignored.
    url_env: str | None = Field(default=None, pattern=_ENV_NAME)
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    # Local file for charges the store could not take (fail_open admissions, commits made
    # while it was down); replayed exactly once when it is back.
    spool: str = Field(default="./sidecar-spool.db", min_length=1)
    # The Redis URL names nodes of a Redis Cluster (`redis://h1:6379,h2:6379/` read as
    # `redis+cluster://...`): the same as writing the cluster scheme.
    cluster: bool = False
    # SQLite: other processes use this file too (an app with the ASGI middleware, another
    # `sidecar serve`), so every decision takes SQLite's write lock. Otherwise one `sidecar
    # serve` owns the file and keeps its budgets in memory (`sidecar/store/sqlite_owned.py`),
    # and a second user of the file is refused at start. Redis is always shared.
    shared: bool = False

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(
            (
                "sqlite:///",
                "redis://",
                "rediss://",
                "redis+cluster://",
                "rediss+cluster://",
                "memory://",
            )
        ):
            raise ValueError("must start with sqlite:///, redis://, rediss:// or redis+cluster://")
        if is_cluster_url(url):
            parse_cluster_url(url)  # a bad node list is a config error, not a start failure
        return url

    @model_validator(mode="after")
    def _cluster_url(self) -> StoreConfig:
        if self.cluster and self.url_env is None:
            as_cluster_url(self.url)  # ValueError: the URL cannot name a cluster
        return self

    @property
    def effective_url(self) -> str:
        """`url` as the store opens it (the cluster form with `cluster: true`)."""
        return as_cluster_url(self.url) if self.cluster else self.url


class GrpcTlsConfig(Strict):
    """TLS on the gRPC listener with client-certificate verification (mTLS): only a peer
    holding a certificate signed by `client_ca_file` (Envoy) may ask for decisions or report
    usage. Files are PEM; they are read at start."""

    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    client_ca_file: str = Field(min_length=1)


class ListenConfig(Strict):
    grpc: str = "127.0.0.1:9001"
    http: str = "127.0.0.1:9002"
    grpc_tls: GrpcTlsConfig | None = None

    @field_validator("grpc", "http")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _HOSTPORT.match(value):
            raise ValueError("must be host:port")
        return value


class HttpConfig(Strict):
    # Peers whose X-Forwarded-For is believed (Envoy, the ingress). Nobody else's is: a
    # client address decides rate limits, so it must not be the client's to choose.
    trusted_proxies: tuple[str, ...] = ()

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        networks = []
        for item in value:
            try:
                networks.append(str(ipaddress.ip_network(item, strict=True)))
            except ValueError as exc:
                raise ValueError(f"{item!r} is not a CIDR network: {exc}") from None
        return tuple(networks)


class SecretsConfig(Strict):
    """Where the key that encrypts secrets kept in the store (signing keys, CSRF) comes from."""

    key_env: str = Field(default="SIDECAR_SECRET_KEY", pattern=_ENV_NAME)
    key_file: str | None = Field(default=None, min_length=1)


class AdminConfig(Strict):
    token_env: str = "SIDECAR_ADMIN_TOKEN"
    # The ingress (nginx, Traefik) presents this token to /authz in
    # `x-sidecar-ingress-token` to receive the provider key headers in the answer; anyone
    # else calling /authz gets the decision without them.
    ingress_token_env: str = "SIDECAR_INGRESS_TOKEN"
    groups: tuple[str, ...] = ()


class IssuerConfig(Strict):
    issuer: str
    audiences: tuple[str, ...] = Field(min_length=1)
    jwks_url: str | None = None
    jwks_file: str | None = None
    algorithms: tuple[Algorithm, ...] = ("RS256",)
    groups_claim: str = "groups"
    leeway_seconds: int = Field(default=30, ge=0, le=600)
    # Floor on JWKS refreshes triggered by an unknown kid, so forged kids can't hammer it.
    refresh_floor_seconds: int = Field(default=30, ge=1)
    cache_seconds: int = Field(default=3600, ge=10)

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerConfig:
        self._exactly_one("jwks_url", "jwks_file")
        return self


class JwtConfig(Strict):
    issuers: tuple[IssuerConfig, ...] = ()


class ServiceTokensConfig(Strict):
    enabled: bool = True


class DeviceLoginConfig(Strict):
    enabled: bool = False
    token_ttl: Duration = "12h"
    # How long a CLI session lasts without a new login: its refresh token, rotated on each
    # use, gets new access tokens until then.
    session_ttl: Duration = "7d"
    public_url: str = ""


class DirectoryGrant(Strict):
    """A grant to the person `issuer` signs in as `email`."""

    email: str = Field(min_length=3)
    issuer: str = Field(min_length=1)


class DirectoryConfig(Strict):
    # A plain address stands for the one configured JWT issuer; with several issuers each
    # grant must say which one it trusts ({email, issuer}).
    groups: dict[str, tuple[str | DirectoryGrant, ...]] = {}


class IdentityConfig(Strict):
    jwt: JwtConfig = JwtConfig()
    service_tokens: ServiceTokensConfig = ServiceTokensConfig()
    device_login: DeviceLoginConfig = DeviceLoginConfig()
    directory: DirectoryConfig = DirectoryConfig()


ProviderApi = Literal[
    "openai", "openai_compatible", "anthropic", "azure_openai", "gemini", "bedrock", "workers_ai"
]


class SecretSource(Strict):
    """Where a secret is read from: an environment variable, or a file (re-read when it
    changes, as a mounted Kubernetes Secret does on rotation)."""

    env: str | None = Field(default=None, min_length=1)
    file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> SecretSource:
        self._exactly_one("env", "file")
        return self


class CredentialsConfig(Strict):
    default: SecretSource | None = None
    # Group name -> its own key (a team billed on its own project or workspace).
    by_group: dict[str, SecretSource] = {}

    @model_validator(mode="after")
    def _something(self) -> CredentialsConfig:
        if self.default is None and not self.by_group:
            raise ValueError("needs default, by_group, or both")
        return self


# The genai-prices providers each API's traffic may be priced as. An OpenAI-compatible
# server may be priced as any of them, or as a provider genai-prices does not know (a
# self-hosted vLLM), whose models only `pricing.overrides` can price.
API_PRICING: dict[str, frozenset[str]] = {
    "openai": frozenset({"openai"}),
    "anthropic": frozenset({"anthropic"}),
    "gemini": frozenset({"google"}),
    "bedrock": frozenset({"aws"}),
    "azure_openai": frozenset({"azure", "openai"}),
    "workers_ai": frozenset({"cloudflare"}),
}
API_DEFAULT_PRICING: dict[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
    "bedrock": "aws",
    "azure_openai": "azure",
    "workers_ai": "cloudflare",
}


class ProviderConfig(Strict):
    id: str = Field(min_length=1)
    path_prefix: str = Field(min_length=1)
    # genai-prices' provider id; when absent, the API's (`gemini`: `google`), else the id.
    pricing_provider: str | None = None
    # The provider's API family: which header carries the key, where the model is named,
    # which genai-prices providers may price it. Inferred from the id (and
    # pricing_provider) when absent.
    api: ProviderApi | None = None
    # None: bring your own key (the client's provider key passes through untouched).
    credentials: CredentialsConfig | None = None
    # Azure OpenAI: deployment name -> the model it runs (`gpt-4o`, as genai-prices names
    # it). A call to a deployment not listed here is refused.
    deployments: dict[str, str] = {}

    @property
    def pricing_id(self) -> str:
        """genai-prices' provider id: `pricing_provider`, else the API's own (`gemini` is
        priced as `google`), else the provider's id."""
        if self.pricing_provider is not None:
            return self.pricing_provider
        return API_DEFAULT_PRICING.get(self.api or "", self.id)

    @model_validator(mode="after")
    def _pricing_fits_api(self) -> ProviderConfig:
        if self.deployments and self.api != "azure_openai":
            raise ValueError("deployments: only for api: azure_openai")
        if any(
            not name.strip() or not model.strip() or "/" in name
            for name, model in self.deployments.items()
        ):
            raise ValueError(
                "deployments: names and models must be non-empty; a deployment name has no '/'"
            )
        if self.api is None or self.api == "openai_compatible" or self.pricing_provider is None:
            return self
        pricing = self.pricing_provider
        allowed = API_PRICING[self.api]
        if pricing not in allowed:
            raise ValueError(
                f"pricing_provider {pricing!r} does not price api {self.api}; "
                f"expected one of {', '.join(sorted(allowed))}"
            )
        return self

    @model_validator(mode="after")
    def _static_key_api(self) -> ProviderConfig:
        bedrock = self.api == "bedrock" or (self.api is None and "bedrock" in self.id)
        if self.credentials is not None and bedrock:
            raise ValueError(
                "credentials: Bedrock signs each request (SigV4); a static key cannot be injected"
            )
        return self

    @field_validator("path_prefix")
    @classmethod
    def _slashes(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value


class ModelRule(Strict):
    groups: tuple[str, ...] = Field(min_length=1)
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


class ModelsConfig(Strict):
    default: Literal["allow", "deny"] = "allow"
    rules: tuple[ModelRule, ...] = ()


class WindowConfig(Strict):
    fixed: Literal["daily", "weekly", "monthly"] | None = None
    rolling: str | None = None
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _one_kind(self) -> WindowConfig:
        self._exactly_one("fixed", "rolling")
        if self.rolling is not None:
            parse_duration(self.rolling)
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(self.timezone)
        except Exception as exc:
            raise ValueError(f"unknown timezone {self.timezone!r}") from exc
        return self


def _check_dimension(name: str) -> str:
    if name not in DIMENSIONS and not _METADATA_DIM.match(name):
        raise ValueError(
            f"unknown dimension {name!r}; expected one of {', '.join(DIMENSIONS)} or metadata.<key>"
        )
    return name


# Token and request limits: whole numbers, never a bool or a float YAML happened to parse.
Count = Annotated[int, Field(strict=True, ge=0, le=10**15)]


class TokenLimitConfig(Strict):
    """Separate limits for input and output tokens (either or both)."""

    input: Count | None = None
    output: Count | None = None

    @model_validator(mode="after")
    def _some(self) -> TokenLimitConfig:
        if self.input is None and self.output is None:
            raise ValueError("tokens needs a number, or input and/or output")
        return self


def _token_form(value: Any) -> str:
    return "token-limits" if isinstance(value, dict | TokenLimitConfig) else "token-count"


# A number (input + output) or {input, output}; the discriminator keeps the errors to the
# form that was written.
TokenLimit = Annotated[
    Annotated[Count, Tag("token-count")] | Annotated[TokenLimitConfig, Tag("token-limits")],
    Discriminator(_token_form),
]
UNIT_FIELDS = ("budget_usd", "tokens", "requests")


class SpendLimitConfig(Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    # Exactly one unit: dollars, tokens (input + output, or each on its own) or requests.
    budget_usd: Money | None = None
    tokens: TokenLimit | None = None
    requests: Count | None = None
    window: WindowConfig
    filter: dict[str, tuple[str, ...]] = {}
    split: tuple[str, ...] = ()
    action: Literal["block", "fallback", "monitor"] = "block"
    alerts: tuple[Annotated[int, Field(ge=1, le=1000)], ...] = ()

    @field_validator("budget_usd", mode="before")
    @classmethod
    def _exact(cls, value: Any) -> Decimal | None:
        return None if value is None else _money(value)

    @model_validator(mode="wrap")
    @classmethod
    def _one_unit(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Wrapped, so a rule without its unit is reported together with its other errors.
        problem = None
        if isinstance(data, dict):
            given = [f for f in UNIT_FIELDS if data.get(f) is not None]
            if len(given) != 1:
                problem = "exactly one of budget_usd, tokens or requests is required" + (
                    f" (got {' and '.join(given)})" if given else ""
                )
        try:
            model = handler(data)
        except ValidationError as exc:
            if problem is None:
                raise
            errors: list[InitErrorDetails] = [
                {"type": PydanticCustomError("unit", problem), "loc": (), "input": data}
            ]
            for err in exc.errors():
                detail: InitErrorDetails = {
                    "type": err["type"],
                    "loc": err["loc"],
                    "input": err["input"],
                }
                if "ctx" in err:
                    detail["ctx"] = err["ctx"]
                errors.append(detail)
            raise ValidationError.from_exception_data(exc.title, errors) from None
        if problem is not None:
            raise ValueError(problem)
        return model

    @property
    def unit(self) -> Literal["usd", "tokens", "requests"]:
        if self.tokens is not None:
            return "tokens"
        return "requests" if self.requests is not None else "usd"

    def public_doc(self) -> dict[str, Any]:
        """The rule as the API shows and stores it: only the unit it has."""
        doc = self.model_dump(mode="json")
        for key in UNIT_FIELDS:
            if doc.get(key) is None:
                doc.pop(key, None)
        if isinstance(doc.get("tokens"), dict):
            doc["tokens"] = {k: v for k, v in doc["tokens"].items() if v is not None}
        return doc

    @field_validator("filter")
    @classmethod
    def _filter_dims(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for key in value:
            _check_dimension(key)
        return value

    @field_validator("split")
    @classmethod
    def _split_dims(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            _check_dimension(key)
        if len(set(value)) != len(value):
            raise ValueError("dimensions must not repeat")
        return value


class FallbackTarget(Strict):
    model: str = Field(min_length=1)
    provider: str | None = None


class PriceOverrideConfig(Strict):
    provider: str
    model: str
    input_per_mtok: Money
    output_per_mtok: Money
    cache_read_per_mtok: Money | None = None
    cache_write_per_mtok: Money | None = None

    @field_validator(
        "input_per_mtok",
        "output_per_mtok",
        "cache_read_per_mtok",
        "cache_write_per_mtok",
        mode="before",
    )
    @classmethod
    def _exact(cls, value: Any) -> Decimal | None:
        return None if value is None else _money(value)


class DefaultPriceConfig(Strict):
    input_per_mtok: Money
    output_per_mtok: Money

    @field_validator("input_per_mtok", "output_per_mtok", mode="before")
    @classmethod
    def _exact(cls, value: Any) -> Decimal:
        return _money(value)


class PricingConfig(Strict):
    unknown_model: Literal["reject"] | DefaultPriceConfig = "reject"
    overrides: tuple[PriceOverrideConfig, ...] = ()


class AdmissionConfig(Strict):
    mode: Literal["reserve", "optimistic"] = "reserve"
    default_max_output_tokens: int = Field(default=1024, ge=1, le=10_000_000)
    reservation_ttl: Duration = "10m"
    # Calls whose cost never comes back through the gateway (realtime sessions, batches,
    # fine-tuning jobs, background responses: sidecar/policy/unmetered.py): `refuse` (403
    # `unmetered_call`), or `reserve`: admitted and charged their reservation.
    unmetered_calls: Literal["refuse", "reserve"] = "refuse"
    # Service tiers billed above the standard price, which is all prices carry
    # (sidecar/policy/service_tier.py): `refuse` (403 `unpriced_service_tier`), or
    # `standard_price`: admitted and charged at the standard price.
    service_tiers: Literal["refuse", "standard_price"] = "refuse"
    # Server-side tools billed apart from tokens at a price no response reports
    # (sidecar/policy/unpriced_tools.py): `refuse` (403 `unpriced_tool`), or `allow`:
    # admitted, their fees uncharged.
    unpriced_tools: Literal["refuse", "allow"] = "refuse"


class WebhookConfig(Strict):
    url: str = Field(pattern=r"^https?://")
    secret_env: str | None = None


class AlertsConfig(Strict):
    webhooks: tuple[WebhookConfig, ...] = ()


class OverloadConfig(Strict):
    """When to refuse a Check at once (503, Retry-After) instead of deciding it late."""

    # Checks in flight per process beyond which new ones are refused; `sidecar envoy-config`
    # gives Envoy the same bound (times --workers). A Check needs a few ms, so a process
    # deciding 1,000 a second has ~10 in flight; 64 absorbs bursts and slow store round
    # trips, while a queue of 64 in front of a process slowed to 250 a second (a shared,
    # saturated machine, measured) is still a quarter of a second, far from Envoy's 2 s.
    max_inflight: int = Field(default=64, ge=1, le=1_000_000)
    # Seconds the event loop may run late before new Checks are refused.
    max_loop_lag_seconds: float = Field(default=1.0, gt=0, le=60)
    # The process's other threads (gRPC's, the store's) run as SCHED_BATCH, their wakeups
    # waiting for the event loop's time slice instead of preempting it: `auto` while the
    # loop is saturated (sidecar/helper_threads.py), `always`, or `never` (the default: it
    # trades tail latency for throughput at saturation).
    batch_helper_threads: Literal["auto", "always", "never"] = "never"


class SidecarConfig(Strict):
    account_id: str = Field(default="default", min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    store: StoreConfig = StoreConfig()
    listen: ListenConfig = ListenConfig()
    http: HttpConfig = HttpConfig()
    secrets: SecretsConfig = SecretsConfig()
    admin: AdminConfig = AdminConfig()
    identity: IdentityConfig = IdentityConfig()
    providers: tuple[ProviderConfig, ...] = ()
    models: ModelsConfig = ModelsConfig()
    spend_limits: tuple[SpendLimitConfig, ...] = ()
    fallbacks: dict[str, tuple[FallbackTarget, ...]] = {}
    pricing: PricingConfig = PricingConfig()
    admission: AdmissionConfig = AdmissionConfig()
    alerts: AlertsConfig = AlertsConfig()
    overload: OverloadConfig = OverloadConfig()

    @field_validator("store", mode="before")
    @classmethod
    def _store_shorthand(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    def _check_directory(self) -> None:
        issuers = [i.issuer for i in self.identity.jwt.issuers]
        for group, members in self.identity.directory.groups.items():
            for index, member in enumerate(members):
                where = f"identity.directory.groups.{group}[{index}]"
                if isinstance(member, DirectoryGrant):
                    if member.issuer not in issuers:
                        raise ValueError(
                            f"{where}: issuer {member.issuer!r} is not in identity.jwt.issuers"
                        )
                elif len(issuers) > 1:
                    raise ValueError(
                        f"{where}: with several JWT issuers a grant must name "
                        f"the one it trusts: {{email: {member}, issuer: ...}}"
                    )

    @model_validator(mode="after")
    def _cross_checks(self) -> SidecarConfig:
        names = [rule.name for rule in self.spend_limits]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"spend_limits: duplicate rule names {dupes}")
        ids = [p.id for p in self.providers]
        if len(set(ids)) != len(ids):
            raise ValueError("providers: duplicate ids")
        self._check_directory()
        for model, chain in self.fallbacks.items():
            for target in chain:
                if target.provider is not None and target.provider not in ids:
                    raise ValueError(
                        f"fallbacks.{model}: provider {target.provider!r} is not in providers"
                    )
                self._check_deployment(model, target)
        return self

    def _check_deployment(self, model: str, target: FallbackTarget) -> None:
        # A fallback on Azure OpenAI is a switch of deployment: one must run the model.
        provider = next((p for p in self.providers if p.id == target.provider), None)
        if provider is None or provider.api != "azure_openai":
            return
        runs = {m.strip().lower() for m in provider.deployments.values()}
        if target.model.strip().lower() not in runs:
            raise ValueError(
                f"fallbacks.{model}: no deployment of provider "
                f"{provider.id!r} runs {target.model!r}"
            )
