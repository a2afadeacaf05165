package helmchart

import "encoding/json"

// The parts of the rendered kinds that the tests look at, with Kubernetes's
// JSON field names (k8s.io/api is not a dependency of this module).

// Deployment is an apps/v1 Deployment.
type Deployment struct {
	Spec struct {
		Replicas int `json:"replicas"`
		Template struct {
			Metadata struct {
				Labels      map[string]string `json:"labels"`
				Annotations map[string]string `json:"annotations"`
			} `json:"metadata"`
			Spec PodSpec `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

// PodSpec is a pod's spec.
type PodSpec struct {
	ServiceAccountName        string            `json:"serviceAccountName"`
	Containers                []Container       `json:"containers"`
	Volumes                   []Volume          `json:"volumes"`
	TopologySpreadConstraints []json.RawMessage `json:"topologySpreadConstraints"`
	NodeSelector              map[string]string `json:"nodeSelector"`
	PriorityClassName         string            `json:"priorityClassName"`
}

// Container is one container of a pod.
type Container struct {
	Name           string          `json:"name"`
	Image          string          `json:"image"`
	Args           []string        `json:"args"`
	Env            []EnvVar        `json:"env"`
	Ports          []ContainerPort `json:"ports"`
	LivenessProbe  *Probe          `json:"livenessProbe"`
	ReadinessProbe *Probe          `json:"readinessProbe"`
	VolumeMounts   []VolumeMount   `json:"volumeMounts"`
}

// EnvVar is one variable of a container's environment.
type EnvVar struct {
	Name      string `json:"name"`
	Value     string `json:"value"`
	ValueFrom *struct {
		FieldRef *struct {
			FieldPath string `json:"fieldPath"`
		} `json:"fieldRef"`
	} `json:"valueFrom"`
}

// ContainerPort is a port a container declares.
type ContainerPort struct {
	Name          string `json:"name"`
	ContainerPort int    `json:"containerPort"`
}

// Probe is a liveness or readiness probe; only HTTP GET probes are used.
type Probe struct {
	HTTPGet *struct {
		Path string `json:"path"`
		// Port is a number or the name of a ContainerPort.
		Port json.RawMessage `json:"port"`
	} `json:"httpGet"`
}

// VolumeMount mounts a volume into a container.
type VolumeMount struct {
	Name      string `json:"name"`
	MountPath string `json:"mountPath"`
}

// Volume is a pod's volume from a Secret or a ConfigMap.
type Volume struct {
	Name   string `json:"name"`
	Secret *struct {
		SecretName string    `json:"secretName"`
		Items      []KeyPath `json:"items"`
	} `json:"secret"`
	ConfigMap *struct {
		Name  string    `json:"name"`
		Items []KeyPath `json:"items"`
	} `json:"configMap"`
}

// KeyPath projects one key of a Secret or ConfigMap to a file.
type KeyPath struct {
	Key  string `json:"key"`
	Path string `json:"path"`
}

// Secret is a v1 Secret.
type Secret struct {
	Data map[string][]byte `json:"data"` // base64 in JSON, as in Kubernetes
}

// ConfigMap is a v1 ConfigMap.
type ConfigMap struct {
	Data map[string]string `json:"data"`
}

// ClusterRoleBinding is an rbac.authorization.k8s.io/v1 ClusterRoleBinding.
type ClusterRoleBinding struct {
	RoleRef struct {
		Kind string `json:"kind"`
		Name string `json:"name"`
	} `json:"roleRef"`
	Subjects []struct {
		Kind      string `json:"kind"`
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"subjects"`
}

// PodDisruptionBudget is a policy/v1 PodDisruptionBudget.
type PodDisruptionBudget struct {
	Spec struct {
		MaxUnavailable json.RawMessage `json:"maxUnavailable"`
		Selector       struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
	} `json:"spec"`
}
