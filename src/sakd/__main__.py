from sakd.cli import main

raise SystemExit(main())
