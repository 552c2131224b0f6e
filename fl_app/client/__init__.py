"""The ClientApp side of a round (docs/architecture.md, Client).

``fl_app.client.app`` holds the ClientApp object Flower loads
(``[tool.flwr.app.components] clientapp``) and its handlers; the other modules are
what the handlers use, one concern each: decoding an instruction, the train pipeline
and its privacy stages, the site's policy, budget ledger, downgrade guard, audit log and
identity. Nothing is re-exported here, so importing the package stays cheap (a fresh
ClientApp process runs each message, and the key-exchange stages must not load torch).
"""
