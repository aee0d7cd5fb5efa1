from twisted.application.service import ServiceMaker

txgateway = ServiceMaker("txgateway", "txgateway.service.tap", "An API gateway: routing, streaming proxy, auth, limits, breakers", "txgateway")
