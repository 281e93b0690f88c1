"""``python -m services.sink``: the sink alone (see ``services.sink.service.main``)."""

from services.sink.service import main

main()
