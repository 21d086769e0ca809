package sardis.registry;

import java.util.ArrayList;

import javax.enterprise.context.ApplicationScoped;
import javax.enterprise.inject.Produces;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;

/**
 * Stands in for the build-time Quarkus extension apicurio-common-app-components-config-index,
 * whose -deployment artifact Maven Central does not serve. That extension only registers a bean
 * listing the properties an admin may change at run time ("dynamic config"). An empty list means
 * no property changes at run time: each keeps its value from system properties or the environment.
 */
@ApplicationScoped
public class DynamicConfigPropertyListProducer {

    @Produces
    @ApplicationScoped
    DynamicConfigPropertyList dynamicConfigPropertyList() {
        return new DynamicConfigPropertyList(new ArrayList<>());
    }
}
