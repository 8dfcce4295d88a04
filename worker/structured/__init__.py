"""Structured outputs: constraints (JSON schema, regex, choice, EBNF) turned into a token mask per
step with xgrammar. `grammar.py` parses a constraint (the validation every front end shares),
`compiler.py` compiles it off the engine thread with an LRU cache, `matcher.py` holds one request's
grammar state, `bitmask.py` fills the step's mask on the host and applies it on the device.
xgrammar is imported only when a constrained request arrives."""
