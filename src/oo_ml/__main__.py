from oo_ml.cli import main

raise SystemExit(main())
