"""What one model's calls must respect, wherever they come from (HTTP, jobs, streams): size limits
and the model's content filter."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LimitSettings, SecuritySettings
from ..errors import BadRequest, ContentBlocked, PayloadTooLarge, Unprocessable
from ..observability import metrics
from .filters import ContentFilter, Filters, StreamFilter


@dataclass
class Policy:
    """What one model's calls must respect: size limits and its content filter (if any)."""

    limits: LimitSettings
    cfilter: ContentFilter | None = None

    def texts(self, texts: list[str], what: str = "input") -> list[str]:
        """Each text checked against the limits and the input filter; returns what the model sees."""
        out: list[str] = []
        cfilter = self.cfilter
        for i, text in enumerate(texts):
            where = f"{what}.{i}" if len(texts) > 1 else what
            if len(text) > self.limits.max_text_chars:
                raise PayloadTooLarge(
                    f"{where} has {len(text)} characters; the limit is {self.limits.max_text_chars}",
                    code="text_too_long",
                )
            if cfilter is None:
                out.append(text)
                continue
            try:
                out.append(cfilter.check_input(text, where))
            except ContentBlocked:
                metrics.CONTENT_FILTERED.labels(cfilter.name, "input").inc()
                raise
        return out

    def max_tokens(self, max_tokens: int | None) -> None:
        if max_tokens is not None and max_tokens > self.limits.max_tokens:
            raise Unprocessable(
                f"max_tokens={max_tokens} is above this server's limit of {self.limits.max_tokens}",
                code="max_tokens_too_large",
            )

    def logprobs(self, logprobs: int | None) -> None:
        """Token logprobs name the generated tokens (and their likely alternatives) one by one, past
        whatever an output filter withholds or masks: refused for a model whose output is filtered."""
        if logprobs is not None and self.cfilter is not None and self.cfilter.filters_output:
            raise BadRequest(
                "logprobs: this model's outputs pass a content filter, which token logprobs would bypass",
                code="logprobs_unavailable",
                param="logprobs",
            )

    def output(self, text: str) -> tuple[str, bool]:
        """(text to return, withheld?): a blocked output is replaced by an empty string."""
        if self.cfilter is None:
            return text, False
        masked = self.cfilter.mask(text)
        if self.cfilter.output_blocked(masked):
            metrics.CONTENT_FILTERED.labels(self.cfilter.name, "output").inc()
            return "", True
        return masked, False

    def stream(self) -> StreamFilter | None:
        return StreamFilter(self.cfilter) if self.cfilter and self.cfilter.filters_output else None

    @classmethod
    def for_model(cls, settings: SecuritySettings, name: str, filters: Filters | None = None) -> Policy:
        return cls(settings.limits, (filters or Filters(settings.filters)).for_model(name))
