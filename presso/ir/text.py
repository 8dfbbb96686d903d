"""The IR's text form: ``printer.print_graph`` and ``parser.parse`` round-trip exactly,
``parse(print_graph(g)) == g``. This module gathers both for callers that want the pair."""
from .parser import parse
from .printer import format_attr, format_node, print_graph

__all__ = ["format_attr", "format_node", "parse", "print_graph"]
