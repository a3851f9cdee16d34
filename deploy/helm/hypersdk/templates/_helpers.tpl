{{/* Labels every object carries. */}}
{{- define "hypersdk.labels" -}}
app.kubernetes.io/part-of: hypersdk
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* IMAGE NAME: the image of one component. */}}
{{- define "hypersdk.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.repository .name (.root.Values.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
