# twistd -ny lmgate.tac: the same service tree as `twistd -n lmgate`, with the
# configuration file named by LMGATE_CONFIG (unset: the embedded demo).
import os

from twisted.application.service import Application

from lmgate.daemon.tap import serviceFor

application = Application("lmgate")
serviceFor(os.environ.get("LMGATE_CONFIG") or None).setServiceParent(application)
