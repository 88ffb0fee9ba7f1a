"""A deterministic stand-in for provider endpoints, for tests and local demos: OpenAI chat,
Responses and embeddings, Anthropic messages, Gemini (`v1beta/models/{model}:...`), Azure
OpenAI (`openai/deployments/{deployment}/...`) and Bedrock Runtime (`model/{id}/converse`,
`converse-stream`, `invoke`, `invoke-with-response-stream`, streams in the binary event
stream framing); one module per API's shapes (`openai`, `anthropic`, `gemini`, `bedrock`).

Usage is a pure function of the request body (`expected_usage`), so a test can compute the
cost the sidecar should charge without trusting the sidecar. Request headers steer it:
`x-fake-delay-ms` (pause between stream frames, or before a JSON answer), `x-fake-status`
(answer that error status with the provider's error shape), `x-fake-gzip: 1` (gzip the
body, streams included). `GET /_seen` shows what arrived here; `DELETE /_seen` forgets it.

Keys are checked per provider prefix when configured (`--key openai=sk-...`, repeatable; a
prefix may accept several keys): a call without one of them is answered 401 with the
provider's error shape, as the real provider would. Anthropic reads `x-api-key`, Gemini
`x-goog-api-key`, Azure `api-key`, the others `Authorization: Bearer`; Bedrock's signatures
are not checked. The provider is the path prefix, else the Host a proxy addressed
(Envoy strips prefixes and sets Host to the provider's). A provider without configured keys
accepts any call.

Replaying recorded responses: started with `--replay-dir DIR`, a request with
`x-fake-replay: NAME` is answered with the file DIR/NAME exactly as stored: `NAME.json` as a
JSON body, `NAME.sse` as an event stream, cut into pieces of `x-fake-chunk-bytes` bytes
(default: one event per piece) so a recorded stream can be delivered split anywhere.
"""

from devtools.fake_provider.app import create_app
from devtools.fake_provider.usage import (
    DEFAULT_OUTPUT_TOKENS,
    MAX_OUTPUT_TOKENS,
    expected_usage,
    output_words,
)

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "MAX_OUTPUT_TOKENS",
    "create_app",
    "expected_usage",
    "output_words",
]
