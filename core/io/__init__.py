"""Files on disk and the terminal, shared by every engine: atomic writes (:mod:`.atomic`), run manifests
(:mod:`.manifest`), data records from local files or dataset names (:mod:`.records`), PNG figures
(:mod:`.plots`) and progress bars (:mod:`.progress`)."""
