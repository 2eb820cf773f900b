"""The ground floor: storage as URIs, the one user-error type, the console, what the Ray cluster is, and the clock.

Owns: ``storage`` (local paths and ``s3://`` through one module), ``versioned``
(compare-and-swap writes of small objects: leases), ``errors``
(``UserError``: one sentence a user can act on), ``console`` (progress bars, Ray's
logs kept quiet), ``cluster`` (nodes now and nodes the autoscaler may add), ``clock``
(now, and seconds as people read them).

May import: nothing of simpsons_ray.
"""
