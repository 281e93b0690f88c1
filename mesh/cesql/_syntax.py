"""CESQL text -> syntax tree, with lark (grammar from spec section 2, precedence from 3.6).

Precedence, loosest first: AND / OR / XOR (one level, left to right, as 3.6 says; the
spec's ANTLR file makes them right-associative, so mixed chains need parentheses to read
the same everywhere); comparisons; ``+ -``; ``* / %``; LIKE and IN; unary NOT and ``-``;
function calls, EXISTS, literals, identifiers, parentheses. Keywords and function names
are case-insensitive; attribute names are lower-cased (CloudEvents names are lower case).

mesh's extension: ``data`` addresses the event's data, ``data.a.b``, ``data.items[0]``
and ``data['odd key']`` the fields inside it (case preserved).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput

from mesh.cesql._values import Value

GRAMMAR = r"""
?start: expr

?expr: cmp
     | expr LOGIC cmp               -> binary

?cmp: add
    | cmp CMP add                   -> binary

?add: mul
    | add ADDOP mul                 -> binary

?mul: post
    | mul MULOP post                -> binary

?post: unary
     | post NOT? LIKE STRING        -> like
     | post NOT? IN "(" expr ("," expr)* ")"  -> in_

?unary: primary
      | NOT unary                   -> not_
      | "-" unary                   -> neg
      | "+" INT                     -> int_lit

?primary: "(" expr ")"
        | EXISTS reference          -> exists
        | NAME "(" [expr ("," expr)*] ")" -> call
        | INT                       -> int_lit
        | TRUE                      -> true
        | FALSE                     -> false
        | STRING                    -> string
        | reference

reference: NAME step*
step: "." NAME                      -> key
    | "[" INT "]"                   -> index
    | "[" STRING "]"                -> key_string

LOGIC.3: /(and|or|xor)(?![a-zA-Z0-9_])/i
NOT.3: /not(?![a-zA-Z0-9_])/i
LIKE.3: /like(?![a-zA-Z0-9_])/i
IN.3: /in(?![a-zA-Z0-9_])/i
EXISTS.3: /exists(?![a-zA-Z0-9_])/i
TRUE.3: /true(?![a-zA-Z0-9_])/i
FALSE.3: /false(?![a-zA-Z0-9_])/i
CMP: "<>" | "!=" | ">=" | "<=" | "=" | "<" | ">"
ADDOP: "+" | "-"
MULOP: "*" | "/" | "%"
INT: /[0-9]+/
NAME: /[a-zA-Z][a-zA-Z0-9_]*/
STRING: /'(\\.|''|[^'\\])*'/s | /"(\\.|""|[^"\\])*"/s

%import common.WS
%ignore WS
"""


@lru_cache(maxsize=1)
def _parser() -> Lark:
    # Built on first use: building the LALR tables costs ~0.1 s, which every ``mesh``
    # command would otherwise pay at import.
    return Lark(GRAMMAR, parser="lalr", maybe_placeholders=False)


class SyntaxProblem(ValueError):
    """The text is not CESQL; the message says where."""


# Syntax tree -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lit:
    value: Value


@dataclass(frozen=True, slots=True)
class Attr:
    name: str


@dataclass(frozen=True, slots=True)
class Data:
    path: tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Exists:
    ref: Attr | Data


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # "NOT" or "-"
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # upper case for the logic operators
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Like:
    operand: Node
    pattern: str
    negated: bool


@dataclass(frozen=True, slots=True)
class In:
    operand: Node
    items: tuple[Node, ...]
    negated: bool


@dataclass(frozen=True, slots=True)
class Call:
    name: str  # upper case
    args: tuple[Node, ...]


Node = Lit | Attr | Data | Exists | Unary | Binary | Like | In | Call


def unquote(text: str) -> str:
    """A string literal's value: ``\\'`` / ``''`` in '...' and ``\\"`` / ``""`` in "..." are
    the quote; any other backslash stays as it is (LIKE gives ``\\%`` and ``\\_`` meaning)."""
    quote, body = text[0], text[1:-1]
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if c in ("\\", quote) and i + 1 < len(body) and body[i + 1] == quote:
            out.append(quote)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _int(token: Token) -> Lit:
    n = int(token)
    # 2147483648 is allowed here only to be negated (-2147483648); compile checks the range.
    if n > 2**31:
        raise SyntaxProblem(f"integer literal {n} is outside the 32 bit range")
    return Lit(n)


@v_args(inline=True)
class _ToTree(Transformer[Token, Node]):
    def binary(self, left: Node, op: Token, right: Node) -> Node:
        text = str(op)
        return Binary(text.upper() if text.isalpha() else text, left, right)

    def like(self, operand: Node, *rest: Token) -> Node:
        negated = len(rest) == 3
        return Like(operand, unquote(str(rest[-1])), negated)

    def in_(self, operand: Node, *rest: Any) -> Node:
        negated = isinstance(rest[0], Token) and rest[0].type == "NOT"
        items = [r for r in rest if not isinstance(r, Token)]
        return In(operand, tuple(items), negated)

    def not_(self, _kw: Token, operand: Node) -> Node:
        return Unary("NOT", operand)

    def neg(self, operand: Node) -> Node:
        if isinstance(operand, Lit) and type(operand.value) is int:
            return Lit(-operand.value) if operand.value else operand
        return Unary("-", operand)

    def int_lit(self, token: Token) -> Node:
        return _int(token)

    def true(self, _t: Token) -> Node:
        return Lit(True)

    def false(self, _t: Token) -> Node:
        return Lit(False)

    def string(self, token: Token) -> Node:
        return Lit(unquote(str(token)))

    def exists(self, _kw: Token, ref: Node) -> Node:
        assert isinstance(ref, Attr | Data)
        return Exists(ref)

    def call(self, name: Token, *args: Node) -> Node:
        return Call(str(name).upper(), tuple(a for a in args if a is not None))

    def reference(self, name: Token, *steps: str | int) -> Node:
        low = str(name).lower()
        if low == "data":
            return Data(tuple(steps))
        if steps:
            raise SyntaxProblem(f"only data has fields: {name}.{steps[0]} is not an attribute")
        if "_" in low:
            raise SyntaxProblem(f"{name!s} is not an attribute name (letters and digits only)")
        return Attr(low)

    def key(self, name: Token) -> str:
        return str(name)

    def key_string(self, token: Token) -> str:
        return unquote(str(token))

    def index(self, token: Token) -> int:
        return int(token)


def parse(text: str) -> Node:
    """Parse CESQL text; raises SyntaxProblem with a one-line reason."""
    try:
        tree = _parser().parse(text)
        node = _ToTree().transform(tree)
    except UnexpectedCharacters as exc:
        char = text[exc.pos_in_stream] if exc.pos_in_stream is not None else "?"
        raise SyntaxProblem(f"unexpected character {char!r} at column {exc.column}") from None
    except UnexpectedInput as exc:
        token = getattr(exc, "token", None)
        if token is None or token.type == "$END":
            raise SyntaxProblem("unexpected end of expression") from None
        raise SyntaxProblem(f"unexpected {str(token)!r} at column {exc.column}") from None
    except LarkError as exc:
        cause = exc.__context__
        if isinstance(cause, SyntaxProblem):
            raise SyntaxProblem(str(cause)) from None
        raise SyntaxProblem(str(exc).splitlines()[0]) from None
    assert isinstance(node, Lit | Attr | Data | Exists | Unary | Binary | Like | In | Call)
    return node
