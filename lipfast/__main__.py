from lipfast.cli import main

raise SystemExit(main())
