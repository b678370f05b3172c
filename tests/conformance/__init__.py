"""OCI distribution-spec v1.1 conformance tests: a pytest port of the official Go suite.

The Go suite (opencontainers/distribution-spec, ``conformance/``) has 79 specs in four
workflows; each is mirrored by one test here, with the same requests, accepted statuses,
headers and bodies:

==================================== ===== =================================================
file                                 specs Go source
==================================== ===== =================================================
test_01_pull.py                      24    01_pull_test.go
test_02_push.py                      29    02_push_test.go
test_03_content_discovery.py         16    03_discovery_test.go
test_04_content_management.py        10    04_management_test.go
==================================== ===== =================================================

Each workflow file ends with a ``TestSpecText*`` class of checks taken from the spec text
(spec.md) that the Go suite does not make; ``test_00_client.py`` unit-tests the helpers offline.

Run against Seawall (the ``seawall_registry`` fixture), any registry (``OCI_ROOT_URL=...``,
same variables as the Go suite) or a local CNCF Distribution used to validate the port::

    .venv/bin/pytest tests/conformance
    OCI_ROOT_URL=http://127.0.0.1:5000 OCI_NAMESPACE=myorg/test .venv/bin/pytest tests/conformance
    OCI_TARGET=distribution .venv/bin/pytest tests/conformance -q -p no:cacheprovider

Modules: ``client.py`` (``OciTarget``, the httpx client with Basic/Bearer auth, content
builders ``make_blob``/``make_config``/``make_manifest``/``make_index``), ``suite.py`` (the Go
``setup.go``: environment toggles, test data, Gomega-like checks) and ``conftest.py`` (target
selection and fixtures).
"""
