"""``python -m deita_ray.report DIR``: rebuild report.json, the plots and report.html of a job's
output directory (:func:`deita_ray.report.assembly.main`)."""

import sys

from deita_ray.report.assembly import main

if __name__ == "__main__":
    sys.exit(main())
