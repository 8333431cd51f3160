"""Executors: where a pool's workers run when not as local processes (`ray_executor`: actors
on a Ray cluster). Each needs its optional extra; import the module only when it is used."""
