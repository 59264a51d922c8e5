from sslmedsam2.cli import main

raise SystemExit(main())
