"""The SQS and S3 drivers over aiobotocore (botocore's asyncio port on aiohttp, which the
mesh already depends on): native coroutines, no thread per request as boto3 would need.
botocore's own retries are off: retrying is the egress's job, durably.

- SQS: the target URL is the queue URL (``https://[KEY:SECRET@]HOST/ACCOUNT/QUEUE``; the
  endpoint is its scheme and host). CloudEvents binary mode: the data is the message
  body, the attributes are message attributes ``ce-<name>`` plus ``content-type``; when
  they would pass SQS's limit of 10 attributes, or the data is not text, the body is the
  structured JSON event instead. FIFO queues (``.fifo``): ``MessageGroupId`` from the
  group-id template, ``MessageDeduplicationId`` the event id. A batch is
  ``SendMessageBatch`` (10 per call), one result per entry.
- S3: ``s3://[KEY:SECRET@]BUCKET[/PREFIX]``, ``--endpoint-url`` for S3-compatible
  stores. One object per event: key from the key template under the prefix, body the
  structured JSON event (``application/cloudevents+json``).

Without credentials in the URL, botocore's usual chain applies (environment, profile).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from mesh import envelope
from mesh.destinations import DestinationOptions, render
from mesh.envelope import Event
from mesh.registry import Target
from services.egress.drivers.base import ERROR_CHARS, Driver, describe, need
from services.egress.drivers.formats import STRUCTURED, attributes, data_body, fields_of, structured
from services.egress.http.sender import AttemptResult

SQS_MAX_ATTRIBUTES = 10
SQS_BATCH = 10
RETRYABLE_CODES = frozenset(
    {"Throttling", "ThrottlingException", "RequestThrottled", "SlowDown", "RequestTimeout"}
)


class _AwsDriver(Driver):
    service: str

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target)
        self.url = url
        self.options = target.options or DestinationOptions()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    def _endpoint_and_region(self) -> tuple[str | None, str]:
        return self.options.endpoint_url, self.options.region or "us-east-1"

    async def _open(self) -> None:
        need("aiobotocore", self.kind)
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        parts = urlsplit(self.url)
        endpoint, region = self._endpoint_and_region()
        config = AioConfig(
            connect_timeout=self.target.timeout_s,
            read_timeout=self.target.timeout_s,
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=max(10, self.target.max_in_flight),
        )
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            get_session().create_client(
                self.service,  # type: ignore[call-overload]
                region_name=region,
                endpoint_url=endpoint,
                aws_access_key_id=unquote(parts.username) if parts.username else None,
                aws_secret_access_key=unquote(parts.password) if parts.password else None,
                config=config,
            )
        )
        self._stack = stack

    async def _shut(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def is_permanent(self, exc: Exception) -> bool:
        from botocore.exceptions import ClientError, ParamValidationError

        if isinstance(exc, ParamValidationError):
            return True
        if isinstance(exc, ClientError):
            return _permanent_code(exc.response)
        return super().is_permanent(exc)

    def drops_connection(self, exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        # An answer keeps the client; anything else (a cut connection can leave
        # aiohttp's pool in a state that only hangs) makes a new one.
        return not isinstance(exc, ClientError)


def _permanent_code(response: dict[str, Any]) -> bool:
    """4xx is the request's fault (missing queue or bucket, refused access): permanent;
    throttling and 5xx: retry."""
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in RETRYABLE_CODES or status in (408, 429) or status >= 500:
        return False
    return 400 <= status < 500 or "NonExistentQueue" in code or code.startswith("NoSuch")


class SqsDriver(_AwsDriver):
    kind = "sqs"
    service = "sqs"

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target, url)
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        # The queue URL without credentials; the endpoint is its scheme and host.
        self.queue_url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        self.endpoint = urlunsplit((parts.scheme, netloc, "", "", ""))
        labels = host.split(".")
        self.region = labels[1] if len(labels) > 3 and labels[0] == "sqs" else None
        self.fifo = parts.path.rstrip("/").endswith(".fifo")

    def _endpoint_and_region(self) -> tuple[str | None, str]:
        endpoint = self.options.endpoint_url or self.endpoint
        return endpoint, self.options.region or self.region or "us-east-1"

    def message(self, event: Event) -> dict[str, Any]:
        """The SendMessage parameters of one event (less the queue URL)."""
        attrs = attributes(event)
        body, ctype = data_body(event)
        try:
            text = body.decode()
        except UnicodeDecodeError:
            text = None
        msg: dict[str, Any]
        if text is None or len(attrs) + 1 > SQS_MAX_ATTRIBUTES:
            msg = {
                "MessageBody": structured(event).decode(),
                "MessageAttributes": _string_attrs({"content-type": STRUCTURED}),
            }
        else:
            named = {envelope.CE_PREFIX + k: v for k, v in attrs.items()}
            named["content-type"] = ctype
            msg = {"MessageBody": text, "MessageAttributes": _string_attrs(named)}
        if self.fifo:
            msg["MessageGroupId"] = render(self.options.group_id, fields_of(event))
            msg["MessageDeduplicationId"] = event.id
        return msg

    async def _send(self, event: Event) -> None:
        await self._client.send_message(QueueUrl=self.queue_url, **self.message(event))

    async def send_batch(
        self, events: Sequence[Event], traces: Sequence[dict[str, str] | None] | None = None
    ) -> list[AttemptResult]:
        """``SendMessageBatch`` by tens; each entry succeeds or fails on its own."""
        results: list[AttemptResult] = []
        for start in range(0, len(events), SQS_BATCH):
            results.extend(await self._batch(events[start : start + SQS_BATCH]))
        return results

    async def _batch(self, events: Sequence[Event]) -> list[AttemptResult]:
        started = time.monotonic()
        results: dict[int, AttemptResult] = {}
        entries = []
        for i, event in enumerate(events):
            try:
                entries.append({"Id": str(i), **self.message(event)})
            except Exception as exc:
                results[i] = AttemptResult(error=describe(exc), permanent=True)
        if entries:
            try:
                async with asyncio.timeout(self.target.timeout_s):
                    await self.connect()
                    answer = await self._client.send_message_batch(
                        QueueUrl=self.queue_url, Entries=entries
                    )
            except Exception as exc:
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError(f"timeout after {self.target.timeout_s:g}s")
                failed = await self._failed(exc, started)
                return [results.get(i, failed) for i in range(len(events))]
            latency = time.monotonic() - started
            for ok in answer.get("Successful", []):
                results[int(ok["Id"])] = AttemptResult(delivered=True, latency_s=latency)
            for bad in answer.get("Failed", []):
                results[int(bad["Id"])] = AttemptResult(
                    error=f"{bad.get('Code')}: {bad.get('Message', '')}"[:ERROR_CHARS],
                    permanent=bool(bad.get("SenderFault")),
                    latency_s=latency,
                )
        return [results.get(i, AttemptResult(error="no answer")) for i in range(len(events))]


class S3Driver(_AwsDriver):
    kind = "s3"
    service = "s3"

    def __init__(self, target: Target, url: str) -> None:
        super().__init__(target, url)
        parts = urlsplit(url)
        self.bucket = parts.hostname or ""
        self.prefix = parts.path.strip("/")

    def key(self, event: Event) -> str:
        key = render(self.options.key, fields_of(event)).lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _send(self, event: Event) -> None:
        await self._client.put_object(
            Bucket=self.bucket,
            Key=self.key(event),
            Body=structured(event),
            ContentType=STRUCTURED,
            Metadata={
                envelope.H_ID: event.id,
                envelope.H_TYPE: event.type,
                envelope.H_SOURCE: event.source,
            },
        )


def _string_attrs(values: dict[str, str]) -> dict[str, dict[str, str]]:
    return {k: {"DataType": "String", "StringValue": v} for k, v in values.items()}
