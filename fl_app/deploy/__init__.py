"""Flower deployment: certificates, node keys, site configs, processes and runs.

``fl-app deploy ...`` (:mod:`fl_app.cli.deploy`) drives these modules.

What each party runs (see ``docs/deployment.md`` for the step-by-step):

* coordinator: ``ca`` (once), ``server-cert`` (the SuperLink's TLS certificate, with a
  subjectAltName for every address SuperNodes and the CLI dial), ``connection`` (a
  ``flwr`` CLI connection with the CA pinned), ``register`` (a site's public key),
  ``revoke`` / ``rotate-key`` (unregister a node's key; register a new one first),
  ``superlink`` (TLS, SuperNode authentication, runtime dependency installation off),
  ``submit`` (``flwr run`` then wait for the run's real status);
* each site: ``node-key`` (an ECDSA P-384 key pair in OpenSSH format: the private key
  never leaves the site, the ``.pub`` goes to the coordinator), ``node-config``
  (a site YAML turned into ``--node-config``), ``supernode``;
* ``demo``: all of the above on 127.0.0.1 (1 SuperLink + 3 SuperNodes), torn down by PID.

Flower 1.41 flags used (checked against ``flower-superlink --help`` / the source):
SuperLink ``--ssl-ca-certfile --ssl-certfile --ssl-keyfile --enable-supernode-auth
--disable-runtime-dependency-installation --host --port``; SuperNode ``--superlink
--root-certificates --auth-supernode-private-key --node-config --port``; CLI
connections in ``$FLWR_HOME/config.toml`` (``[superlink.<name>]`` with ``address`` and
``root-certificates``); ``flwr supernode register <key.pub> <connection>``.

Insecure mode (no TLS, no node authentication) exists only behind ``--insecure``, which
prints a warning every time it is used.

Trust assumptions: the CA key signs the only certificate SuperNodes accept for the
SuperLink, so whoever holds it can impersonate the coordinator; keep it offline. TLS
authenticates the SuperLink to SuperNodes (not the reverse); SuperNodes authenticate
with their registered key. Neither hides model updates from the coordinator: that is
secure aggregation's job (``secagg=...``).

Modules, one per concern (docs/architecture.md, "Where each concern lives"):
:mod:`~fl_app.deploy.pki` (CA, SuperLink certificate, node and signing keys, roster),
:mod:`~fl_app.deploy.site` (site YAML -> node config), :mod:`~fl_app.deploy.procs`
(Flower executables, their environment and command lines, process groups),
:mod:`~fl_app.deploy.flwr_cli` (the ``flwr`` CLI: connection file, register, submit,
status, logs), :mod:`~fl_app.deploy.revoke` (revoke a SuperNode, rotate its key;
docs/operations.md), :mod:`~fl_app.deploy.federation` (the loopback federation of the demo,
tests and benchmark), :mod:`~fl_app.deploy.site_check` (a SuperNode's start-up checks).
"""

from __future__ import annotations

__all__ = ["DeployError"]


class DeployError(Exception):
    """A deployment step cannot proceed; the message names the input and the fix."""
