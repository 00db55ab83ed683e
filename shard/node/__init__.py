"""Node runtimes: what a stage, coordinator or registry process does between its servicer
and the library (sessions, edges, plan following). Servicers in services/ stay thin."""
