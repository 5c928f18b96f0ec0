"""A small PromQL reader for checking dashboards: which series selectors an expression
uses (metric name and label matchers) and which labels it groups or matches by.

It accepts the PromQL that dashboards are written in (selectors, ranges, offsets,
functions, aggregations with by/without before or after, binary operators with
bool/on/ignoring/group_left/group_right, numbers, strings, subqueries) and raises
PromQLError on anything else, so a typo does not slip through as "not a metric".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                          "count_values", "bottomk", "topk", "quantile", "limitk",
                          "limit_ratio"})  # fmt: skip
FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_quantile", "histogram_count", "histogram_sum", "holt_winters", "hour",
    "idelta", "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10",
    "minute", "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort",
    "sort_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
})  # fmt: skip
BINARY = frozenset({"+", "-", "*", "/", "%", "^", "==", "!=", "<=", ">=", "<", ">", "and", "or",
                    "unless", "atan2"})  # fmt: skip
MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}])
    )""",
    re.VERBOSE,
)
_DURATION = re.compile(r"^\[\s*(\d+[smhdwy])+\s*(:\s*((\d+[smhdwy])+)?\s*)?\]$")


class PromQLError(ValueError):
    pass


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    # (label, the metrics of the expression it groups or matches over)
    groupings: list[tuple[str, frozenset[str]]] = field(default_factory=list)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise PromQLError(f"cannot read {text[pos : pos + 20]!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.q = Query()

    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("end", "")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        t = self.peek()
        if (value is not None and t[1] != value) or (kind is not None and t[0] != kind):
            raise PromQLError(f"expected {value or kind}, found {t[1] or 'the end'!r}")
        self.i += 1
        return t[1]

    def labels(self) -> list[str]:
        self.take("(")
        out = []
        while self.peek()[1] != ")":
            out.append(self.take(kind="ident"))
            if self.peek()[1] == ",":
                self.take(",")
        self.take(")")
        return out

    def expr(self) -> set[str]:
        metrics = self.unary()
        while self.peek()[1] in BINARY:
            self.take()
            matching: list[str] = []
            if self.peek()[1] == "bool":
                self.take()
            if self.peek()[1] in ("on", "ignoring"):
                self.take()
                matching += self.labels()
            if self.peek()[1] in ("group_left", "group_right"):
                self.take()
                if self.peek()[1] == "(":
                    matching += self.labels()
            metrics |= self.unary()
            self.q.groupings += [(label, frozenset(metrics)) for label in matching]
        return metrics

    def unary(self) -> set[str]:
        if self.peek()[1] in ("-", "+"):
            self.take()
        metrics = self.primary()
        if self.peek()[0] == "range" and not _DURATION.match(self.take()):
            raise PromQLError(f"not a range: {self.toks[self.i - 1][1]!r}")
        if self.peek()[1] == "offset":
            self.take()
            self.take(kind="number")  # `5m` reads as the number 5, then the unit m
            self.take(kind="ident")
        return metrics

    def args(self) -> set[str]:
        self.take("(")
        metrics: set[str] = set()
        while self.peek()[1] != ")":
            metrics |= self.expr()
            if self.peek()[1] == ",":
                self.take(",")
            elif self.peek()[1] != ")":
                raise PromQLError(f"expected , or ), found {self.peek()[1]!r}")
        self.take(")")
        return metrics

    def primary(self) -> set[str]:
        kind, value = self.peek()
        if kind in ("number", "string"):
            self.take()
            return set()
        if value == "(":
            self.take("(")
            metrics = self.expr()
            self.take(")")
            return metrics
        if value == "{":
            raise PromQLError("a selector without a metric name")
        if kind != "ident":
            raise PromQLError(f"unexpected {value or 'end'!r}")
        self.take()
        if value in AGGREGATIONS:
            grouping: list[str] = []
            if self.peek()[1] in ("by", "without"):
                self.take()
                grouping = self.labels()
            metrics = self.args()
            if self.peek()[1] in ("by", "without"):
                self.take()
                grouping = self.labels()
            self.q.groupings += [(label, frozenset(metrics)) for label in grouping]
            return metrics
        if self.peek()[1] == "(":
            if value not in FUNCTIONS:
                raise PromQLError(f"no function {value!r}")
            return self.args()
        matchers = []
        if self.peek()[1] == "{":
            self.take("{")
            while self.peek()[1] != "}":
                label = self.take(kind="ident")
                op = self.take()
                if op not in MATCH_OPS:
                    raise PromQLError(f"not a matcher operator: {op!r}")
                text = self.take(kind="string")
                matchers.append((label, op, text[1:-1]))
                if self.peek()[1] == ",":
                    self.take(",")
                elif self.peek()[1] != "}":
                    raise PromQLError(f"expected , or }}, found {self.peek()[1]!r}")
            self.take("}")
        self.q.selectors.append(Selector(value, tuple(matchers)))
        return {value}


def parse(text: str) -> Query:
    p = _Parser(text)
    p.expr()
    if p.peek()[0] != "end":
        raise PromQLError(f"unexpected {p.peek()[1]!r} after the expression")
    return p.q
