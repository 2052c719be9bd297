from coreset_ext.cli import main

raise SystemExit(main())
