"""A real multi-node Ray cluster on this machine (`ray start --head` + `ray start --address`), driven as a user would:
`orch submit/status/logs/list/stop` through the Ray Jobs API, Ray's own `ray job submit`, and, last (it takes the
second node away), `orch run cluster=ray` from outside: an elastic run on both nodes that loses one.

Every node runs in its own process group with its own ports and is stopped by that group, never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.launch.ray_session import free_port

pytestmark = pytest.mark.slow

ORCH = [sys.executable, "-m", "orchestrator.cli"]
RAY = str(Path(sys.executable).with_name("ray"))


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--object-store-memory=150000000",
    ]


def _wait_http(url: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # answered (401 without a token): the server is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU, job server) + one worker node (1 CPU): two nodes, so two workers must land apart."""
    temp_dir = Path(f"/tmp/orch-cl-{os.getpid()}")  # short: Ray's socket paths live under it
    gcs_port, dashboard_port = free_port(), free_port()
    # token authentication, as on a real cluster: every node, driver and client gets the token from Ray's
    # standard variables, never from a command line
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HYDRA_FULL_ERROR": "1",
        # what orch sets for its own local Ray (orchestrator.launch.ray_session.LOCAL_INSTANCE_ENV); on a cluster it
        # is the operator's choice, made here as it would be there: each fit ends ~3 s sooner than at Ray's 2 s
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        # how soon the head declares a lost node dead: Ray's GCS checks every 3 s and gives up after 5 missed checks
        # (~15 s); an operator may shorten it, as here, so the elastic run below waits less for it
        "RAY_health_check_period_ms": "1000",
        # `ray start --block` on SIGTERM marks its node as draining and waits up to 30 s (for Ray Serve's replicas) before
        # it stops: nothing here needs that, and the module's teardown would wait for it
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    nodes = []
    try:
        nodes.append(
            subprocess.Popen(
                [RAY, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                 "--include-dashboard=true", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
                 "--node-ip-address=127.0.0.1", *_node_ports()],
                env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )
        jobs_url = f"http://127.0.0.1:{dashboard_port}"
        _wait_http(f"{jobs_url}/api/version")
        nodes.append(
            subprocess.Popen(
                # its own temp dir: two nodes on one machine sharing one would garbage-collect each other's
                # runtime environments (a job's shipped working directory vanishes under it)
                [RAY, "start", "--block", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1", f"--temp-dir={temp_dir}-w",
                 "--node-ip-address=127.0.0.1", *_node_ports()],
                env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )
        deadline = time.time() + 300  # a loaded 2-core machine can take minutes to start a node
        while len(_alive_nodes(jobs_url, env)) < 2:
            assert time.time() < deadline, "the second node never joined"
            time.sleep(1)
        yield {"gcs": f"127.0.0.1:{gcs_port}", "jobs": jobs_url, "shared": tmp_path_factory.mktemp("shared"), "env": env,
               "worker_node": nodes[1]}
    finally:
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(f"{temp_dir}-w", ignore_errors=True)


def _state(jobs_url: str, env: dict[str, str], resource: str, filters: tuple = (), detail: bool = False) -> list[dict]:
    """Ray's State API over HTTP (the dashboard's /api/v0/<resource>, what `ray list` asks), with the cluster's token:
    a plain request, where a Python process importing ray.util.state costs ~2.5 CPU-s per question."""
    query = {"limit": 100, "detail": str(detail).lower(), "filter_keys": [key for key, _, _ in filters],
             "filter_predicates": [predicate for _, predicate, _ in filters], "filter_values": [value for _, _, value in filters]}
    request = urllib.request.Request(f"{jobs_url}/api/v0/{resource}?{urllib.parse.urlencode(query, doseq=True)}",
                                     headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["data"]["result"]["result"]
        except OSError:  # a head busy starting or shedding a lost node: ask again, as `ray list` would be
            if time.time() > deadline:
                raise
            time.sleep(1)


def _processes_with(*words: str) -> list[int]:
    """PIDs of this machine's processes whose command line holds every one of `words` (the nodes run here)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(word in command for word in words):
            found.append(int(cmdline.parent.name))
    return found


def _alive_nodes(jobs_url: str, env: dict[str, str]) -> list[str]:
    return [node["node_id"] for node in _state(jobs_url, env, "nodes", (("state", "=", "ALIVE"),))]


def _common(shared: Path, name: str) -> list[str]:
    return [
        f"name={name}",
        f"trainer.storage_path={shared / 'orch_runs'}",
        f"tracking.uri=sqlite:///{shared / 'mlflow.db'}",
        f"tracking.artifact_location={(shared / 'mlartifacts').as_uri()}",
        "trainer.max_steps=20",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=10",
    ]


def _orch(cluster, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ORCH, *args], cwd=cluster["shared"], env=cluster["env"], capture_output=True, text=True, timeout=timeout)


def test_submit_follow_and_stop_jobs_through_the_jobs_api(cluster):
    user_dir = cluster["shared"] / "project"
    (user_dir / "conf" / "model").mkdir(parents=True)
    # the user's own config option, shipped with the working directory and used on the cluster
    (user_dir / "conf" / "model" / "tiny.yaml").write_text(
        "defaults:\n  - /schema/model@_here_: mlp\n  - _self_\ninput_shape: ${data.input_shape}\n"
        "num_classes: ${data.num_classes}\nhidden_sizes: [16]\n"
    )
    env = {**cluster["env"], "ORCH_TEST_VALUE": "pl41n-value"}
    submit = subprocess.run(
        [*ORCH, "submit", "--address", cluster["jobs"], "--env", "ORCH_TEST_VALUE", "--env", "HYDRA_FULL_ERROR", "model=tiny",
         *_common(cluster["shared"], "submitted")],
        cwd=user_dir, env=env, capture_output=True, text=True, timeout=120,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().splitlines()[-1]
    assert "pl41n-value" not in submit.stdout + submit.stderr

    logs = _orch(cluster, "logs", job_id, "--follow", "--address", cluster["jobs"], timeout=600)
    assert logs.returncode == 0 and "done train" in logs.stdout, logs.stdout[-3000:] + logs.stderr[-2000:]
    assert "pl41n-value" not in logs.stdout
    status = _orch(cluster, "status", job_id, "--address", cluster["jobs"])
    assert status.returncode == 0 and status.stdout.strip().startswith(f"{job_id}: SUCCEEDED")
    assert json.loads(_orch(cluster, "status", job_id, "--json", "--address", cluster["jobs"]).stdout)["status"] == "SUCCEEDED"
    assert job_id in _orch(cluster, "list", "--address", cluster["jobs"]).stdout
    assert job_id in {job["job_id"] for job in json.loads(_orch(cluster, "list", "--json", "--address", cluster["jobs"]).stdout)}
    tail = _orch(cluster, "logs", job_id, "--tail", "3", "--address", cluster["jobs"]).stdout
    assert len(tail.splitlines()) == 3 and all(line in logs.stdout for line in tail.splitlines())

    run = MlflowClient(f"sqlite:///{cluster['shared'] / 'mlflow.db'}").search_runs(
        ["1"], filter_string="tags.`orch.run_name` = 'submitted'"
    )[0]
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.params["model.hidden_sizes"]) == [16]  # the shipped conf/model/tiny.yaml was used
    assert "pl41n-value" not in json.dumps(run.data.params)

    long_job = subprocess.run(
        [*ORCH, "submit", "--address", cluster["jobs"], *_common(cluster["shared"], "to-stop"), "trainer.max_steps=100000"],
        cwd=user_dir, env=cluster["env"], capture_output=True, text=True, timeout=120,
    ).stdout.strip().splitlines()[-1]
    stop = _orch(cluster, "stop", long_job, "--address", cluster["jobs"])
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    deadline = time.time() + 120
    while "STOPPED" not in (stopped := _orch(cluster, "status", long_job, "--address", cluster["jobs"])).stdout:
        assert time.time() < deadline, "the job did not stop"
        time.sleep(2)
    assert stopped.returncode == 1  # scripts can branch on a job that did not succeed
    # stopped means no more training (a job stopped while still PENDING once went on training for 10 minutes, holding
    # the cluster's CPUs): the job's driver process is gone, no Train controller or worker is alive on the cluster (the
    # first job has ended, the sweep below has not started), and so no checkpoint appears afterwards
    def still_running() -> tuple[list[int], list[str]]:
        alive = _state(cluster["jobs"], cluster["env"], "actors", (("state", "=", "ALIVE"),))
        return (_processes_with("orchestrator.cli", "name=to-stop"),
                [actor["class_name"] for actor in alive if actor["class_name"] in ("TrainController", "RayTrainWorker")])

    deadline = time.time() + 60
    while any(running := still_running()):
        assert time.time() < deadline, f"the stopped job still runs (driver PIDs, Train actors): {running}"
        time.sleep(1)
    run_dir = cluster["shared"] / "orch_runs" / "to-stop"
    before = sorted(run_dir.glob("checkpoint_step_*"))
    time.sleep(3)
    assert sorted(run_dir.glob("checkpoint_step_*")) == before, "the stopped job is still training"

    # a path that lives on the cluster is checked there, by the job's driver before it starts Ray: `orch submit`
    # passes it on, and the job fails in its first seconds with the same one line `orch run` would print
    missing = _orch(cluster, "submit", "--follow", "--address", cluster["jobs"], *_common(cluster["shared"], "no-corpus"),
                    "model=gpt", "data=text", "data.path=/no/such/corpus.txt", timeout=300)
    assert missing.returncode == 1 and "orch: error: data.path='/no/such/corpus.txt'" in missing.stdout, missing.stdout[-2000:]
    assert "ended FAILED" in missing.stderr


def test_unreachable_cluster_fails_fast_with_a_clear_error(tmp_path):
    port = free_port()  # nothing listens there
    started = time.time()
    out = subprocess.run(
        [*ORCH, "submit", "--address", f"http://127.0.0.1:{port}", "trainer.storage_path=/tmp/x", "tracking.uri=sqlite:////tmp/x.db"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "no Ray job server answers" in out.stderr
    assert time.time() - started < 30
    run = subprocess.run(
        [*ORCH, "run", "cluster=ray", f"cluster.address=127.0.0.1:{port}"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and "cluster.address" in run.stderr


def test_submit_a_sweep_follow_it_and_find_its_runs_and_best_config(cluster):
    """`orch submit --sweep` as a user types it: a 2-trial grid, one worker per trial (one trial per node), the space
    edited on the command line; followed with --follow, then checked in the shared MLflow store and storage."""
    shared = cluster["shared"]
    lrs = [0.001, 0.03]
    submit = _orch(
        cluster, "submit", "--sweep", "--follow", "--address", cluster["jobs"],
        "sweep.name=cluster", "sweep.search=grid", "sweep.num_samples=1", "sweep.scheduler.name=none",
        f"sweep.space.trainer.optimizer.lr={{grid: [{lrs[0]}, {lrs[1]}]}}",
        "~sweep.space.model.hidden_sizes", "~sweep.space.trainer.micro_batch_size",
        *_common(shared, "unused")[1:], "trainer.num_workers=1", "trainer.eval_every=10", "model.hidden_sizes=[16]",
        "tracking.log_model=false",
        timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    job_id = submit.stdout.strip().splitlines()[0]
    assert "best val_accuracy" in submit.stdout and "rerun it:" in submit.stdout, submit.stdout[-3000:]
    assert _orch(cluster, "status", job_id, "--address", cluster["jobs"]).stdout.strip().startswith(f"{job_id}: SUCCEEDED")

    client = MlflowClient(f"sqlite:///{shared / 'mlflow.db'}")
    [parent] = client.search_runs(["1"], filter_string="tags.`orch.sweep` = 'cluster'")
    assert parent.info.status == "FINISHED" and parent.data.params["search"] == "grid"
    assert parent.data.params["space.trainer.optimizer.lr"] == f"grid({lrs[0]}, {lrs[1]})"
    assert parent.data.params["max_concurrent_trials"] == "2"  # 2 one-CPU nodes, 1 worker per trial
    children = client.search_runs(["1"], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
    assert sorted(float(run.data.params["trainer.optimizer.lr"]) for run in children) == lrs
    best = parent.data.tags["orch.best_trial_run_id"]
    assert best in {run.info.run_id for run in children}
    assert "best/best.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id, "best")}
    best_yaml = shared / "orch_runs" / parent.data.tags["orch.run_name"] / "best" / "best.yaml"
    assert best_yaml.is_file() and "trainer:" in best_yaml.read_text()


def test_ray_job_submit_with_local_tracking_is_refused_naming_tracking_uri(cluster, tmp_path):
    """`ray job submit` (Ray's own CLI, not orch's) with orch's default local tracking: the job's driver refuses in
    one line naming `tracking.uri`, because the store would be written into the job's temporary copy of the working
    directory, which Ray deletes."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("the job's working directory\n")
    for _attempt in range(6):
        _wait_http(f"{cluster['jobs']}/api/version")
        out = subprocess.run(
            [RAY, "job", "submit", "--address", cluster["jobs"], "--working-dir", str(project), "--",
             sys.executable, "-m", "orchestrator.cli", "run", "cluster=ray", "cluster.address=auto", "trainer.num_workers=1"],
            env=cluster["env"], capture_output=True, text=True, timeout=600, check=False,
        )
        # a head still starting on a busy machine drops the upload or has no job agent yet: submit again, as Ray's
        # own message says to
        if not any(busy in out.stdout + out.stderr for busy in ("Connection aborted", "please try again later",
                                                                 "Failed to connect to Ray")):
            break
        time.sleep(10)
    assert out.returncode != 0, out.stdout[-3000:]
    # Ray's CLI shows the job's output twice (the tail, then the status message): one distinct line
    errors = sorted({line for line in out.stdout.splitlines() if line.startswith("orch: error:")})
    assert len(errors) == 1, out.stdout[-3000:] + out.stderr[-2000:]
    assert errors[0].startswith("orch: error: tracking.uri='sqlite:///") and "inside Ray job raysubmit_" in errors[0]
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]


def _lose_node(node: subprocess.Popen) -> None:
    """SIGKILL every process of a node at once (its raylet and the workers it started, which Ray puts in process
    groups of their own), as a machine that vanishes would."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
    doomed, queue = [], [node.pid]
    while queue:
        pid = queue.pop()
        doomed.append(pid)
        queue.extend(children.get(pid, []))
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait(timeout=30)


def test_an_elastic_run_that_loses_a_node_finishes_on_the_workers_left(cluster):
    """Last in this module: it kills the second node. `trainer.num_workers=[1,2]` starts on both nodes; rank 0 holds
    after the checkpoint of step 30 while the worker node is SIGKILLed (raylet and its workers: a node lost, not
    drained); Ray Train restarts the group on the one CPU left, the workers reshard the 2-rank ZeRO-2 checkpoint
    through the universal conversion, and the run ends in its one MLflow run with every step logged once."""
    shared, name = cluster["shared"], "elastic"
    hold = shared / "elastic-go"
    callback = f"{{_target_: orchestrator.train.callbacks.HoldAt, step: 30, rank: 0, until: '{hold}'}}"
    run = subprocess.Popen(
        [*ORCH, "run", "cluster=ray", f"cluster.address={cluster['gcs']}", *_common(shared, name),
         "trainer.num_workers=[1,2]", "trainer.placement_strategy=STRICT_SPREAD", "trainer.zero_stage=2",
         "trainer.max_steps=60", "trainer.max_failures=3", "tracking.log_model=false",
         "trainer.log_every=1",
         f"trainer.callbacks=[{callback}]"],
        # Ray Train's controller may still count the lost node's CPU once: its start of a 2-worker group then
        # waits this long (default 60 s) before it retries with the workers the cluster has
        cwd=shared, env={**cluster["env"], "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 400
        while not Path(f"{hold}.reached").exists():
            assert run.poll() is None and time.time() < deadline, "the run never reached step 30"
            time.sleep(0.5)
        # `orch run cluster=ray` from outside the cluster, STRICT_SPREAD: its 2 workers on 2 nodes
        workers = _state(cluster["jobs"], cluster["env"], "actors",
                         (("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")), detail=True)
        assert len(workers) == 2 and len({worker["node_id"] for worker in workers}) == 2, workers
        lost = time.time()
        _lose_node(cluster["worker_node"])
        deadline = time.time() + 120  # the head's health checks declare it dead (Ray Train then sees one CPU)
        while len(_alive_nodes(cluster["jobs"], cluster["env"])) > 1:
            assert time.time() < deadline, "the head never declared the killed node dead"
            time.sleep(1)
        hold.touch()
        declared = time.time()
        output, _ = run.communicate(timeout=600)
        print(f"node declared dead {declared - lost:.0f} s after the kill; the run ended {time.time() - declared:.0f} s later")
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-4000:]

    client = MlflowClient(f"sqlite:///{shared / 'mlflow.db'}")
    [mlflow_run] = client.search_runs(["1"], filter_string=f"tags.`orch.run_name` = '{name}'")
    assert mlflow_run.info.status == "FINISHED"
    sizes = [(m.step, m.value) for m in sorted(client.get_metric_history(mlflow_run.info.run_id, "orch.world_size"),
                                                key=lambda m: m.step)]
    assert sizes == [(0, 2.0), (30, 1.0)], sizes  # logged at each start, at the step it starts from
    losses = sorted(client.get_metric_history(mlflow_run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == list(range(1, 61))  # every step once: none lost, none repeated
    # continuous: the restart continued from step 30's weights (a restart from scratch starts near ln 10 = 2.3)
    before = sum(m.value for m in losses[20:30]) / 10
    after = sum(m.value for m in losses[30:40]) / 10
    first = sum(m.value for m in losses[:5]) / 5
    assert after <= 1.25 * before and after < 0.6 * first, (first, before, after)
    # the run's progress board sits on the driver's node (the head here), never on a node the run may lose
    nodes = _state(cluster["jobs"], cluster["env"], "nodes")
    boards = _state(cluster["jobs"], cluster["env"], "actors", (("class_name", "=", "ProgressBoard"),), detail=True)
    assert boards and {board["node_id"] for board in boards} == {n["node_id"] for n in nodes if n["is_head_node"]}
    # the 2-rank checkpoint was resharded for one rank through DeepSpeed's universal format, beside the original
    assert list((shared / "orch_runs" / name).glob("**/checkpoint_step_*30.universal")), output[-3000:]
