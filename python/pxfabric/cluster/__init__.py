"""``pxcluster``: start, stop and list pxfabric clusters (a controller plus one MPI job of engines).

A cluster is ``pxcontroller`` plus **one** ``mpirun -n N <engine>`` job, both started in the
background in new sessions, with their output in ``<profile_dir>/log/``. What was started is
recorded in a state file, ``<profile_dir>/security/pxcluster-<cluster_id or "default">.json``,
so that ``pxcluster stop`` and ``pxcluster list`` work from any later shell. Processes are only
ever found and signalled by PID (checked against their start time, so a reused PID is never
touched), together with their descendants and the members of the sessions we created.

Command line (``scripts/pxcluster`` or ``/usr/bin/python3 -m pxfabric``)::

    pxcluster start -n 4 [--profile NAME | --profile-dir DIR] [--cluster-id ID]
                         [--hostfile FILE] [--mpi-args "..."] [--engines pxengine|ipengine]
                         [--restart-hung SECONDS] [--timeout S]
    pxcluster start -n 64 --slurm [--nodes N] [--time T] [--partition P] [--account A]
                         [--qos Q] [--slurm-args "..."] [--slurm-template FILE]
                         [--slurm-launch srun|mpirun]              (see pxfabric.slurm)
    pxcluster stop  [--profile NAME | --profile-dir DIR] [--cluster-id ID] [--all]
    pxcluster restart [--profile NAME | --profile-dir DIR] [--cluster-id ID] [--timeout S]
    pxcluster where [--profile NAME | --profile-dir DIR] [--cluster-id ID] [--timeout S] [--json]
    pxcluster list  [--profile NAME | --profile-dir DIR] [--json]
    pxcluster check --hostfile FILE [--mpi-args "..."] [--timeout S]

With ``--hostfile`` (see ``hostfiles/README.md`` and :mod:`pxfabric.hostfile`) the controller
listens for engines on the address that routes to the hosts, the job gets its connection
info in ``$IPP_CONNECTION_INFO`` (no shared filesystem needed), and a failed start says
which host is at fault.

The same functions are usable from Python: :func:`start_cluster`, :func:`stop_cluster`,
:func:`list_clusters`.

The package, one module per job (every name is also here, as when this was one module):

* :mod:`.messages` -- ``ClusterError``, progress lines, the commands that reach a cluster again
* :mod:`.locations` -- profile directory, state/connection/log file paths, the registry
* :mod:`.programs` -- controller, engine and mpirun command lines, their environment
* :mod:`.state` -- the state file (atomic JSON), the profile lock
* :mod:`.processes` -- a recorded cluster's processes by PID (stopping: :mod:`pxfabric.processes`)
* :mod:`.hub` -- queries to the controller's registration socket (engines, hosts, stats)
* :mod:`.start`, :mod:`.stop`, :mod:`.listing` -- ``pxcluster start``, ``stop``, ``list``
* :mod:`.cli` -- the command line (``main``)
"""

# Re-exported: `from pxfabric.cluster import X` and `cluster.X` keep working for every name
# the rest of pxfabric (restart, slurm, connect, watch, where, launchers), the tests, bench/ and
# scripts/ use, including the private helpers pxcluster's other commands share.
from .cli import build_parser, main  # noqa: F401
from .hub import (QUERY_TIMEOUT, controller_stats, engine_hosts, hub_connection,  # noqa: F401
                  query_hub, registered_engines, request)
from .listing import cluster_status, engine_job_death, format_list, list_clusters  # noqa: F401
from .locations import (_tag, connection_files, ipython_dir, log_paths,  # noqa: F401
                        resolve_profile_dir, state_path)
from .messages import ClusterError, _say, _selector_args, connect_hint  # noqa: F401
from .processes import (TERM_GRACE, _collect, _is_alive, _pid_reused, _proc_record,  # noqa: F401
                        _process, _session_members, _tree, terminate, wait_gone)
from .programs import (DEFAULT_CONTROLLER, DEFAULT_PXENGINE, ENGINE_KINDS,  # noqa: F401
                       MPI_ENV_DEFAULTS, PYTHON, PYTHON_DIR, REPO, _local_mpi_env,
                       controller_program, engine_program, mpirun_command, process_env,
                       profile_args, pxengine_available, pxengine_program)
from .start import (DEFAULT_TIMEOUT, _Interrupted, _log_tail, _popen,  # noqa: F401
                    _refuse_running, _signals_interrupt, check_hostfile, start_cluster,
                    start_watcher)
from .state import (STATE_VERSION, _profile_lock, _read_json, _unlink,  # noqa: F401
                    _write_json_atomic, load_state, remove_state, save_state)
from .stop import _stop_from_state, stop_cluster  # noqa: F401
