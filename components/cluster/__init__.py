"""Scale-out: multi-node training as a Kubernetes job, configured by ``orchestration.multinode``.

The flows call one function, ``train_on_cluster`` (submit, follow, return the ``TrainResult``).
Which module does what:

* ``rules.py``: ``validate_job``, every rule a job must pass (S3 output dir, names, data claim and root,
  image, recipe, tracking server, pod environment) and the ``ClusterJob`` it returns.
* ``manifests.py``: the job's manifests (Indexed Job + headless Service, or Kubeflow TrainJob), the
  launcher Role, the torchrun flags and the pods' S3 mirror command.
* ``names.py``: the job's DNS name and the labels of its objects.
* ``api.py``: the Kubernetes API calls of a job's life, with retries of transient failures.
* ``status.py``: reading a job's and a pod's state.
* ``logs.py``: relaying pod 0's log to the caller's logger and its progress records to ``on_epoch``.
* ``runner.py``: ``train_on_cluster``, the run end to end (submit, follow, clean up, SIGTERM).
* ``__main__.py``: ``python -m components.cluster`` prints a job's manifests or (``--rbac``) the Role.
"""

from components.cluster.runner import train_on_cluster

__all__ = ["train_on_cluster"]
