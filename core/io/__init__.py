"""Files on disk shared by every engine: atomic writes (:mod:`.atomic`), run manifests (:mod:`.manifest`),
data records from local files or dataset names (:mod:`.records`) and PNG figures (:mod:`.plots`)."""
