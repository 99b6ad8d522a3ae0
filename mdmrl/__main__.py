from mdmrl.cli import main

raise SystemExit(main())
